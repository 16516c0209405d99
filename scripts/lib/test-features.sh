# Sourced by scripts/test.sh and scripts/lib/kiln-server.sh: the cargo features the test build
# uses, in one place, so the scripts that reuse that build (conformance, Prometheus) get the same
# binary instead of rebuilding the workspace with other features. The GPU backend (`wgpu`) is in
# unless KILN_TEST_WGPU=0.
test_features=(--features kiln-engine/wgpu)
if [[ "${KILN_TEST_WGPU:-1}" == 0 ]]; then
  test_features=()
fi
