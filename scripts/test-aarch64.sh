#!/usr/bin/env bash
# Cross-builds the quant crate for aarch64 with Debian's rustc (rustup's toolchain has no aarch64
# std here) and runs its tests under qemu user-mode emulation, where the bf16 kernels (`bfdot`,
# `bfmmla`, inline assembly) meet the same scalar reference as on x86. Correctness only: emulated
# timings mean nothing. Installs what is missing (Debian packages, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
[[ -x /usr/bin/rustc && -x /usr/bin/cargo ]] || need+=(rustc-web cargo-web)
[[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ]] || need+=(libstd-rust-web-dev:arm64)
if (( ${#need[@]} )); then
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  dpkg --add-architecture arm64
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Without default features the crate has no dependencies (no rayon), so the build takes seconds.
# KILN_REQUIRE_KERNELS makes the tests fail, instead of skipping, if qemu's CPU lacks FEAT_BF16.
# Do not set QEMU_LD_PREFIX: with it, threaded programs (libtest) spin forever under qemu.
PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/aarch64-cross \
KILN_REQUIRE_KERNELS=bfdot,bfmmla \
  cargo test --target aarch64-unknown-linux-gnu -p kiln-quant --no-default-features \
  --config 'target.aarch64-unknown-linux-gnu.linker="aarch64-linux-gnu-gcc"' \
  --config 'target.aarch64-unknown-linux-gnu.runner=["qemu-aarch64-static"]' "$@"
