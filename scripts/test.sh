#!/usr/bin/env bash
# Run every kiln test: fetches all-MiniLM-L6-v2 if it is missing (the fixture and end-to-end
# tests need the real model), then the whole workspace's tests. Extra arguments go to cargo test.
#
# Fixtures are read from $KILN_FIXTURES (default ../shared/fixtures); the model from
# $KILN_MODEL_DIR (default models/local/all-MiniLM-L6-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${KILN_MODEL_DIR:-}" ]]; then
  scripts/fetch-model.sh
fi
exec cargo test --workspace "$@"
