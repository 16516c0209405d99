#!/usr/bin/env bash
# Run every kiln test: fetches all-MiniLM-L6-v2 if it is missing (the fixture and end-to-end
# tests need the real model), then the whole workspace's tests, GPU backend included. Extra
# arguments go to cargo test.
#
# Fixtures are read from $KILN_FIXTURES (default ../shared/fixtures); the model from
# $KILN_MODEL_DIR (default models/local/all-MiniLM-L6-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${KILN_MODEL_DIR:-}" ]]; then
  scripts/fetch-model.sh
fi
# The GPU backend is built in (the `wgpu` feature), and the device tests run on every wgpu adapter
# the machine has: Mesa's lavapipe (apt-get install mesa-vulkan-drivers libvulkan1) stands in for a
# GPU where there is none, and CI sets KILN_REQUIRE_WGPU=1 so a missing adapter fails the run.
# KILN_TEST_WGPU=0 leaves the feature out (a quicker first build; the wgpu tests then pass empty).
. scripts/lib/test-features.sh
exec cargo test --workspace "${test_features[@]}" "$@"
