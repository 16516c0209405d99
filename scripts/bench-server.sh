#!/usr/bin/env bash
# Load benchmark of `kiln serve` (release build): wrk POSTs one fixed text to /v1/embeddings at
# each concurrency for DURATION seconds and reports requests/s, p50 and p99; `kiln bench` gives
# the engine-only throughput for the same shapes (batch = concurrency, the text's token count),
# the upper bound the server is measured against. Results go to stdout as Markdown rows.
#
# Usage: scripts/bench-server.sh [DURATION=20] [CONCURRENCIES="1 8 32"]
# Env: KILN_MODEL_DIR; BASELINE_URL=http://127.0.0.1:8000 also loads a running Python baseline
# (../shared/baselines/py_server.py) with the same requests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/kiln-server.sh
duration=${1:-20}
concurrencies=${2:-"1 8 32"}
model=${KILN_MODEL_DIR:-models/local/all-MiniLM-L6-v2}
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }

cargo build --release -q -p kiln-server --bin kiln
export KILN_BIN=${CARGO_TARGET_DIR:-target}/release/kiln
# 16 tokens with [CLS] and [SEP], the 1x16 / 8x16 / 32x16 shapes of docs/BENCHMARKS.md.
text="kiln serves sentence embeddings over http with dynamic batching"
work=$(mktemp -d)
trap 'stop_kiln || true; rm -rf "$work"' EXIT
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"input": "$text", "model": "all-MiniLM-L6-v2"}'
wrk.headers["Content-Type"] = "application/json"
LUA

# Percent of both CPUs busy over 2 s (measured while no benchmark runs: other processes).
cpu_busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( 100 * (total - idle) / (total > 0 ? total : 1) ))
}
# Waits up to BENCH_WAIT_QUIET seconds (default 300) for other work (a build, another benchmark)
# to leave the CPUs mostly idle; prints the background load it settled for.
wait_quiet() {
  local waited=0 busy
  busy=$(cpu_busy)
  while (( busy > ${BENCH_MAX_BACKGROUND:-10} && waited < ${BENCH_WAIT_QUIET:-300} )); do
    sleep 3; waited=$(( waited + 5 )); busy=$(cpu_busy)
  done
  echo "$busy"
}

run_wrk() { # URL CONCURRENCY LABEL
  local background
  background=$(wait_quiet)
  local out
  out=$(wrk -t "$(( $2 < 2 ? 1 : 2 ))" -c "$2" -d "${duration}s" --timeout 30s --latency \
    -s "$work/post.lua" "$1/v1/embeddings")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  echo "| $3 | $2 | $rps | $p50 | $p99 | ${errors:-0} | ${background}% |"
}

start_kiln "$model" --model-id all-MiniLM-L6-v2 >&2
tokens=$(curl -s "$KILN_URL/tokenize" -H 'content-type: application/json' -d "{\"inputs\": \"$text\"}" |
  python3 -c 'import json,sys; print(len(json.load(sys.stdin)[0]))')
echo "text: \"$text\" ($tokens tokens); wrk ${duration}s per row; $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| server | concurrency | requests/s | p50 | p99 | non-2xx | other CPU use before the row |"
echo "|---|---|---|---|---|---|---|"
for c in $concurrencies; do
  run_wrk "$KILN_URL" "$c" kiln
done
batches=$(curl -s "$KILN_URL/metrics" | awk '/^kiln_batch_size_sum/ {s=$2} /^kiln_batch_size_count/ {n=$2} END {printf "%.1f", s/n}')
echo
echo "mean sequences per engine call over the whole run: $batches"
stop_kiln
if [[ -n "${BASELINE_URL:-}" ]]; then
  for c in $concurrencies; do
    run_wrk "$BASELINE_URL" "$c" "python baseline"
  done
fi
echo
echo "engine only (kiln bench, same shapes, tokenization and HTTP excluded):"
shapes=$(for c in $concurrencies; do printf '%sx%s,' "$c" "$tokens"; done)
echo "other CPU use before: $(wait_quiet)%"
"$KILN_BIN" bench --model "$model" --shapes "${shapes%,}" --iters 60 --max-seconds 15
