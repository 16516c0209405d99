#!/usr/bin/env bash
# Metrics conformance: `promtool check metrics` on a live scrape of `kiln serve` must exit 0, and a
# real Prometheus server (Debian's `prometheus`, on loopback) must scrape /metrics with up == 1
# and ingest kiln's series. Exits non-zero on any failure (CI runs it from .ci/run).
#
# Needs `prometheus` and `promtool` on PATH (apt: prometheus). Env: KILN_BIN, KILN_MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/kiln-server.sh
for tool in prometheus promtool curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install prometheus curl)" >&2; exit 1; }
done
prometheus --version 2>&1 | head -1

model=${KILN_MODEL_DIR:-models/local/all-MiniLM-L6-v2}
work=$(mktemp -d)
prom_pid=""
cleanup() {
  [[ -n "$prom_pid" ]] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null
  stop_kiln || true
  rm -rf "$work"
}
trap cleanup EXIT
start_kiln "$model"

# Traffic first, so histograms, failures and the SDPA counter have samples.
curl -sf "$KILN_URL/v1/embeddings" -H 'content-type: application/json' \
  -d '{"input": ["promtool checks names", "and types"]}' >/dev/null
curl -s "$KILN_URL/v1/embeddings" -H 'content-type: application/json' -d '{"input": []}' >/dev/null
curl -sf "$KILN_URL/v2/models/all-MiniLM-L6-v2/infer" \
  -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}' >/dev/null

echo "--- promtool check metrics (live scrape of $KILN_URL/metrics)"
curl -sf "$KILN_URL/metrics" > "$work/scrape.txt"
promtool check metrics < "$work/scrape.txt"
echo "promtool: clean ($(grep -c '^# TYPE' "$work/scrape.txt") metric families)"
for series in kiln_request_total kiln_request_duration_seconds_bucket kiln_queue_duration_seconds_bucket \
    kiln_tokenization_duration_seconds_bucket kiln_inference_duration_seconds_bucket kiln_batch_size_bucket \
    kiln_batch_tokens_bucket kiln_request_input_tokens_bucket kiln_queue_size \
    kiln_model_load_duration_seconds kiln_sdpa_kernel_calls_total kiln_build_info \
    'kiln_request_failure_total{.*reason="validation"} 1' 'kiln_model_memory_bytes{model="all-MiniLM-L6-v2"}'; do
  grep -q "^$series" "$work/scrape.txt" || { echo "missing in scrape: $series" >&2; exit 1; }
done

echo "--- Prometheus scraping kiln"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target=${KILN_URL#http://}
cat > "$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: kiln
    static_configs:
      - targets: ["$target"]
YML
promtool check config "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$port" --log.level=warn >"$work/prometheus.log" 2>&1 &
prom_pid=$!
query() {
  curl -sf --get "http://127.0.0.1:$port/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
up=""
for _ in $(seq 1 60); do
  up=$(query 'up{job="kiln"}' 2>/dev/null || true)
  [[ "$up" == 1 ]] && break
  sleep 1
done
if [[ "$up" != 1 ]]; then
  cat "$work/prometheus.log" >&2
  curl -s "http://127.0.0.1:$port/api/v1/targets" >&2 || true
  echo "Prometheus: up{job=\"kiln\"} is '${up}', not 1" >&2
  exit 1
fi
echo "Prometheus: up{job=\"kiln\"} == 1"
requests=$(query 'sum(kiln_request_total{job="kiln"})')
echo "Prometheus: sum(kiln_request_total) == $requests"
[[ -n "$requests" && "$requests" != 0 ]] || { echo "kiln_request_total not ingested" >&2; exit 1; }
echo "prometheus check: OK"
