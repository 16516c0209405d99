# syntax=docker/dockerfile:1
#
# kiln in a container: a Rust build stage, and a slim Debian runtime stage that runs `kiln serve`
# as an unprivileged user, with HTTP on 8080 and gRPC on 8081.
#
#   docker build -t kiln .
#   docker run --rm -p 8080:8080 -p 8081:8081 \
#     -v "$PWD/models/local:/models:ro" -v kiln-cache:/var/cache/kiln kiln
#
# Settings: every `kiln serve` flag is also a KILN_* environment variable (`docker run -e
# KILN_MAX_BATCH_TOKENS=4096 ...`), or pass flags after the image name (`docker run ... kiln serve
# --max-batch-tokens 4096`). The images are build arguments, so a mirror or a locally built
# image can stand in for Docker Hub's (scripts/container-smoke.sh does that).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# Cargo features of kiln-server, space- or comma-separated: the wgpu GPU backend by default
# (`--build-arg CARGO_FEATURES=` builds a CPU-only kiln, ~15 minutes faster on 2 cores).
ARG CARGO_FEATURES="wgpu"
ENV CARGO_HOME=/usr/local/cargo \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds (BuildKit or buildah); the binary is copied
# out of the cached target directory within the same step.
RUN --mount=type=cache,id=kiln-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=kiln-target,target=/src/target \
    cargo build --release --locked -p kiln-server --bin kiln \
        ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
    && install -m 0755 target/release/kiln /usr/local/bin/kiln \
    && /usr/local/bin/kiln --version

FROM ${RUNTIME_IMAGE}
# The Vulkan loader, through which the wgpu backend finds a GPU's driver (the NVIDIA container
# toolkit, or the host's Mesa, provides the driver itself). Without a driver `--device auto`
# picks the CPU.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvulkan1 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin kiln \
    && mkdir -p /models /var/cache/kiln \
    && chown kiln:kiln /var/cache/kiln
COPY --from=build /usr/local/bin/kiln /usr/local/bin/kiln

# Defaults for the image; each can be overridden with -e or the matching flag. KILN_MODEL is a
# folder under the /models volume; KILN_CACHE_DIR holds compiled plans (a volume, so they
# survive restarts).
ENV KILN_HOST=0.0.0.0 \
    KILN_PORT=8080 \
    KILN_GRPC_PORT=8081 \
    KILN_MODEL=/models/all-MiniLM-L6-v2 \
    KILN_CACHE_DIR=/var/cache/kiln
VOLUME ["/models", "/var/cache/kiln"]
EXPOSE 8080 8081
USER 10001:10001

# `kiln health` GETs http://127.0.0.1:$KILN_PORT/health: 200 once the model is loaded and warmed
# up. (No curl in the slim image.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["kiln", "health"]

# kiln is PID 1: it handles SIGTERM and SIGINT itself (stops accepting, drains in-flight HTTP and
# gRPC requests, exits 0), so no init process is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kiln"]
CMD ["serve"]
