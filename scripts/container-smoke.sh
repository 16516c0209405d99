#!/usr/bin/env bash
# Proves the Dockerfile on a machine with podman and no Docker Hub: builds a Debian bookworm base
# image with debootstrap (`podman import`), a Rust builder from it (Debian's Rust 1.96:
# scripts/container/builder.Containerfile), then the unmodified Dockerfile with both substituted
# through its build arguments (RUST_IMAGE, RUNTIME_IMAGE). Runs the image with the model folder
# mounted read-only and a named cache volume, waits for its HEALTHCHECK, checks it runs as the
# unprivileged user with kiln as PID 1, calls /v1/embeddings and gRPC ModelInfer (tritonclient)
# and compares the answers with the fixtures, then stops it (SIGTERM) and checks a clean exit 0.
# Prints the time of every stage. Not run by CI (a release build in a container takes long).
#
# Usage: scripts/container-smoke.sh   (as root, like the rest of this machine's tooling)
# Env: KILN_SMOKE_HTTP_PORT (18680), KILN_SMOKE_GRPC_PORT (18681), KILN_SMOKE_REBUILD_BASE=1 to
#      debootstrap again, KILN_SMOKE_CARGO_FEATURES (passed as CARGO_FEATURES), KILN_MODEL_DIR,
#      KILN_FIXTURES, KILN_CONFORMANCE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
last=$start
timings=()
stage() { # NAME: records the time since the previous stage under NAME
  local now
  now=$(date +%s)
  timings+=("$(printf '%-44s %5ss' "$1" $((now - last)))")
  last=$now
}
say() { echo "=== $* ($(( $(date +%s) - start ))s)"; }

http_port=${KILN_SMOKE_HTTP_PORT:-18680}
grpc_port=${KILN_SMOKE_GRPC_PORT:-18681}
model=${KILN_MODEL_DIR:-models/local/all-MiniLM-L6-v2}
fixtures=${KILN_FIXTURES:-../shared/fixtures}
base=localhost/kiln-bookworm-base:latest
builder=localhost/kiln-rust-builder:1.96
image=localhost/kiln:smoke
name=kiln-smoke
cache_volume=kiln-smoke-cache

# podman with runc and explicit ulimits (see scripts/container/containers.conf).
export CONTAINERS_CONF=$root/scripts/container/containers.conf
need=()
for tool in podman runc debootstrap iptables curl; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if (( ${#need[@]} )); then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman runc debootstrap iptables curl \
    netavark aardvark-dns conmon slirp4netns >/dev/null
fi
podman --version
[[ -f "$model/model.safetensors" ]] || scripts/fetch-model.sh "$model"
model=$(cd "$model" && pwd)
stage "prerequisites"

work=$(mktemp -d /var/tmp/kiln-smoke.XXXXXX)
cleanup() {
  podman rm -f "$name" >/dev/null 2>&1 || true
  podman volume rm -f "$cache_volume" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -n "${KILN_SMOKE_REBUILD_BASE:-}" ]] || ! podman image exists "$base"; then
  say "debootstrap bookworm (minbase) -> $base"
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi
stage "base image (debootstrap + podman import)"

say "builder stand-in for rust:*-bookworm -> $builder"
mkdir -p "$work/builder/ca-certificates"
cp scripts/container/builder.Containerfile "$work/builder/Containerfile"
# This machine's extra CAs (a TLS-re-signing egress proxy), so cargo in the build reaches crates.io.
cp /usr/local/share/ca-certificates/*.crt "$work/builder/ca-certificates/" 2>/dev/null || true
podman build -q --build-arg BASE_IMAGE="$base" -t "$builder" "$work/builder" >/dev/null
podman run --rm "$builder" cargo --version
stage "builder image"

say "podman build of ./Dockerfile (release build of kiln inside; long on 2 cores)"
# Docker's image format: the OCI format podman defaults to has no HEALTHCHECK.
podman build --format docker --build-arg RUST_IMAGE="$builder" --build-arg RUNTIME_IMAGE="$base" \
  --build-arg CARGO_FEATURES="${KILN_SMOKE_CARGO_FEATURES:-}" -t "$image" . >"$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log"; exit 1; }
grep -E '^ *Finished|kiln [0-9]' "$work/build.log" || true
echo "image size: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.1f MB", $1 / 1e6}')"
stage "kiln image build (podman build .)"

say "run: model mounted read-only at /models, cache volume, ports $http_port (HTTP) $grpc_port (gRPC)"
podman rm -f "$name" >/dev/null 2>&1 || true
podman volume rm -f "$cache_volume" >/dev/null 2>&1 || true
# Settings both ways: an env var, and a flag after the image name.
podman run -d --name "$name" \
  -p "127.0.0.1:$http_port:8080" -p "127.0.0.1:$grpc_port:8081" \
  -v "$(dirname "$model"):/models:ro" -v "$cache_volume:/var/cache/kiln" \
  -e KILN_MODEL="/models/$(basename "$model")" -e KILN_MAX_CONCURRENT_REQUESTS=64 \
  "$image" serve --model-id all-MiniLM-L6-v2 --max-batch-tokens 4096 >/dev/null
healthy=""
for _ in $(seq 1 240); do
  if podman healthcheck run "$name" >/dev/null 2>&1; then healthy=yes; break; fi
  [[ $(podman inspect --format '{{.State.Running}}' "$name") == true ]] || break
  sleep 0.5
done
[[ -n "$healthy" ]] || { podman logs "$name" | tail -30; echo "never healthy" >&2; exit 1; }
echo "HEALTHCHECK (kiln health): healthy; status $(podman inspect --format '{{.State.Health.Status}}' "$name" 2>/dev/null || echo '?')"
stage "container start until HEALTHCHECK passes"

failures=0
check() { # NAME CONDITION-EXIT-CODE DETAIL
  if [[ $2 == 0 ]]; then echo "ok   $1 $3"; else echo "FAIL $1 $3"; failures=$((failures + 1)); fi
}
uid=$(podman exec "$name" id -u); check "runs as uid 10001" $([[ $uid == 10001 ]]; echo $?) "(uid $uid)"
pid1=$(podman exec "$name" cat /proc/1/comm); check "kiln is PID 1" $([[ $pid1 == kiln ]]; echo $?) "($pid1)"
rc=0; podman exec "$name" sh -c 'touch /var/cache/kiln/.w && rm /var/cache/kiln/.w' || rc=$?
check "cache volume writable by kiln" $rc "(KILN_CACHE_DIR=$(podman exec "$name" printenv KILN_CACHE_DIR))"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/health")
check "/health through the published port" $([[ $code == 200 ]]; echo $?) "($code)"

venv=${KILN_CONFORMANCE_VENV:-.venv-conformance}
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check 'tritonclient[http,grpc]' numpy
rc=0
"$venv/bin/python" scripts/container/smoke_check.py --http "http://127.0.0.1:$http_port" \
  --grpc "127.0.0.1:$grpc_port" --fixtures "$fixtures/minilm" --model all-MiniLM-L6-v2 || rc=$?
check "answers match the fixtures (HTTP and gRPC)" $rc ""
stage "checks (/v1/embeddings, gRPC ModelInfer)"

say "stop (SIGTERM, up to 30 s before a SIGKILL)"
podman stop -t 30 "$name" >/dev/null
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
check "exit code after SIGTERM is 0" $([[ $exit_code == 0 ]]; echo $?) "($exit_code)"
rc=0; podman logs "$name" 2>&1 | grep -q 'shut down cleanly' || rc=$?
check "kiln logged a clean shutdown" $rc ""
stage "stop and exit check"

echo
echo "stage timings:"
printf '  %s\n' "${timings[@]}"
echo "  total                                        $(( $(date +%s) - start ))s"
if (( failures )); then
  podman logs "$name" 2>&1 | tail -30
  echo "container smoke test: $failures check(s) failed"
  exit 1
fi
echo "container smoke test: OK"
