#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, libFuzzer through `cargo +nightly fuzz`) for FUZZ_SECONDS each
# (default 60) from the checked-in seed corpus (fuzz/seeds/<target>) and the crashes found so far
# (fuzz/regressions/<target>). A crash fails the run, and its input is copied to
# fuzz/regressions/<target>/ so that `cargo test` replays it from then on (commit it with the fix).
#
# Installs what it needs: the nightly toolchain and cargo-fuzz. The first build compiles the
# server with sanitizer instrumentation (tens of minutes on 2 cores), which is why CI does not run
# this script: CI replays the corpus and regressions in `cargo test` (kiln-server's
# `fuzzing::tests`), and this script is run by hand or on a schedule. FUZZ_TARGETS="a b" runs some.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list --fuzz-dir fuzz)}"
# cargo-fuzz's default build is optimised with overflow checks and debug assertions on, so an
# arithmetic wrap on a size is a finding too.
cargo +nightly fuzz build --fuzz-dir fuzz
failed=()
for t in $targets; do
  work="fuzz/corpus/$t"
  mkdir -p "$work" "fuzz/regressions/$t"
  echo "=== fuzzing $t for ${seconds}s"
  # The first corpus folder collects new inputs; seeds and regressions are read only.
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
    failed+=("$t")
    for crash in fuzz/artifacts/"$t"/*; do
      [[ -f "$crash" ]] && cp "$crash" "fuzz/regressions/$t/" && echo "kept $crash in fuzz/regressions/$t/"
    done
  fi
done
if (( ${#failed[@]} )); then
  echo "fuzz targets that crashed: ${failed[*]}" >&2
  exit 1
fi
echo "every fuzz target ran ${seconds}s without a crash"
