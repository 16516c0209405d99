#!/usr/bin/env bash
# gRPC beside HTTP under load, one load generator for both: h2load (nghttp2-client) sends the
# same 16-token text as KServe v2 gRPC ModelInfer (h2c, raw_input_contents, built with
# tritonclient's own protobuf classes) and as OpenAI /v1/embeddings over HTTP/1.1 (h2load --h1),
# in a closed loop at each concurrency (one connection per client, one request in flight on
# each). h2load reports requests/s and mean latency; it counts HTTP statuses, and a failed gRPC
# call is still HTTP 200, so kiln's own counters (kiln_request_success_total{api,model}) are checked
# to have grown by the number of requests sent.
#
# Usage: scripts/bench-grpc.sh [DURATION=15] [CONCURRENCIES="1 8 32"]
# Env: KILN_BIN (default: a release build), KILN_MODEL_DIR, KILN_CONFORMANCE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/kiln-server.sh
duration=${1:-15}
concurrencies=${2:-"1 8 32"}
model=${KILN_MODEL_DIR:-models/local/all-MiniLM-L6-v2}
command -v h2load >/dev/null || { echo "h2load not found (apt-get install nghttp2-client)" >&2; exit 1; }
if [[ -z "${KILN_BIN:-}" ]]; then
  cargo build --release -q -p kiln-server --bin kiln
  export KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
fi
venv=${KILN_CONFORMANCE_VENV:-.venv-conformance}
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check 'tritonclient[grpc]' numpy

text="kiln serves sentence embeddings over http with dynamic batching"
work=$(mktemp -d)
trap 'stop_kiln || true; rm -rf "$work"' EXIT
# One gRPC message: flag 0 (uncompressed), 4-byte big-endian length, the serialized request.
"$venv/bin/python" - "$work/grpc.bin" "$text" <<'PY'
import struct, sys
from tritonclient.grpc import service_pb2
text = sys.argv[2].encode()
req = service_pb2.ModelInferRequest(model_name="all-MiniLM-L6-v2")
req.inputs.add(name="text", datatype="BYTES", shape=[1])
req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
body = req.SerializeToString()
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(body)) + body)
PY
printf '{"input": "%s", "model": "all-MiniLM-L6-v2"}' "$text" > "$work/http.json"

start_kiln "$model" --model-id all-MiniLM-L6-v2 >&2
# Every model's successes for one API family (the series carry `api` and `model` labels).
successes() { curl -s "$KILN_URL/metrics" | awk -v p="kiln_request_success_total{api=\"$1\"," 'index($1, p) == 1 {n += $2} END {print n + 0}'; }

echo "text: \"$text\" (16 tokens); h2load ${duration}s per row; $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| protocol | concurrency | requests/s | mean latency | sd | requests | all succeeded |"
echo "|---|---|---|---|---|---|---|"
row() { # LABEL API CONCURRENCY H2LOAD-ARGS...
  local label=$1 api=$2 c=$3
  shift 3
  local before out rps mean sd sent after
  before=$(successes "$api")
  out=$(h2load -c "$c" -m 1 -t "$(( c < 2 ? 1 : 2 ))" -D "$duration" "$@" 2>&1)
  after=$(successes "$api")
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  read -r mean sd < <(awk '/^time for request:/ {print $6, $7}' <<<"$out")
  sent=$(awk '/^requests:/ {print $8}' <<<"$out")  # succeeded (HTTP status)
  local ok=no
  (( ${after%.*} - ${before%.*} == sent )) && ok=yes
  echo "| $label | $c | $rps | $mean | $sd | $sent | $ok |"
}
for c in $concurrencies; do
  row "gRPC ModelInfer (raw)" grpc "$c" -d "$work/grpc.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$KILN_GRPC/inference.GRPCInferenceService/ModelInfer"
  row "HTTP/1.1 /v1/embeddings" openai "$c" --h1 -d "$work/http.json" \
    -H 'content-type: application/json' "$KILN_URL/v1/embeddings"
done
stop_kiln
