#!/usr/bin/env bash
# Build kiln (release, with the wgpu GPU backend) and serve all-MiniLM-L6-v2 on port 8080, fetching
# the model first if it is missing. Extra arguments go to `kiln serve` (see `kiln serve --help`),
# e.g. `--port 9000` or `--device cpu`. KILN_FEATURES overrides the cargo features ("" for none).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${KILN_MODEL:-models/local/all-MiniLM-L6-v2}
if [[ ! -f "$model/model.safetensors" ]]; then
  scripts/fetch-model.sh "$model"
fi
features=${KILN_FEATURES-wgpu}
exec cargo run --release -p kiln-server --bin kiln ${features:+--features "$features"} \
  -- serve --model "$model" "$@"
