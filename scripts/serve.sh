#!/usr/bin/env bash
# Build kiln (release) and serve all-MiniLM-L6-v2 on port 8080, fetching the model first if it is
# missing. Extra arguments go to `kiln serve` (see `kiln serve --help`), e.g. `--port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${KILN_MODEL:-models/local/all-MiniLM-L6-v2}
if [[ ! -f "$model/model.safetensors" ]]; then
  scripts/fetch-model.sh "$model"
fi
exec cargo run --release -p kiln-server --bin kiln -- serve --model "$model" "$@"
