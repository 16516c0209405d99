#!/usr/bin/env bash
# The hostile-input and fault tests (tests/e2e/hostile_*.rs, plan_cache_faults.rs) against a
# release build of `kiln`: integer overflow wraps silently in release builds where debug builds
# panic, so these run against both. `scripts/test.sh` (CI) runs them against the debug build;
# this script builds `kiln` with --release and points the same tests at it with KILN_BIN. It is
# not a CI step (a release build of the workspace costs CI another quarter hour on 2 cores).
# Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${KILN_MODEL_DIR:-}" ]]; then
  scripts/fetch-model.sh
fi
. scripts/lib/test-features.sh
cargo build --release -p kiln-server --bin kiln "${test_features[@]}"
KILN_BIN="$PWD/target/release/kiln" exec cargo test --workspace "${test_features[@]}" \
  --test hostile_generation --test hostile_kserve --test plan_cache_faults "$@"
