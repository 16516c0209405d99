#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, libFuzzer through `cargo +nightly fuzz`) for FUZZ_SECONDS each
# (default 60) from the checked-in seed corpus (fuzz/seeds/<target>) and the crashes found so far
# (fuzz/regressions/<target>). A crash fails the run, and its input is copied to
# fuzz/regressions/<target>/ so that `cargo test` replays it from then on (commit it with the fix).
#
# Installs what it needs: the nightly toolchain and cargo-fuzz. The first build compiles the
# server with sanitizer instrumentation: 13 minutes on 2 cores optimised (the default), 8 with
# FUZZ_PROFILE=dev (unoptimised: about a tenth of the executions per second). CI runs the dev
# build for 30 s per target; run the optimised one by hand or on a schedule for longer.
# FUZZ_TARGETS="a b" runs some targets only.
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
flags=(--fuzz-dir fuzz)
case "${FUZZ_PROFILE:-release}" in
  release) ;;
  dev) flags+=(--dev) ;;
  *) echo "FUZZ_PROFILE is release or dev, not ${FUZZ_PROFILE}" >&2; exit 2 ;;
esac
cargo +nightly fuzz build "${flags[@]}"
failed=()
for t in $targets; do
  work="fuzz/corpus/$t"
  mkdir -p "$work" "fuzz/regressions/$t"
  echo "=== fuzzing $t for ${seconds}s"
  # The first corpus folder collects new inputs; seeds and regressions are read only.
  if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$work" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
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
