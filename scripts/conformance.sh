#!/usr/bin/env bash
# Client conformance: the official `tritonclient[http,grpc]` and `openai` packages from PyPI, in a
# venv, used unmodified against `kiln serve` with all-MiniLM-L6-v2 — HTTP (conformance.py) and the
# gRPC port (conformance_grpc.py) of one server; every embedding must match the
# sentence-transformers fixtures. Then a causal LM with openai, and a repository of three models
# with both tritonclient transports and openai (conformance_repository.py). Exits non-zero on
# any failure (CI runs it from .ci/run).
#
# Env: KILN_BIN (default: the workspace's debug build), KILN_MODEL_DIR, KILN_FIXTURES,
#      KILN_CONFORMANCE_VENV (default .venv-conformance).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/kiln-server.sh

venv=${KILN_CONFORMANCE_VENV:-.venv-conformance}
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check 'tritonclient[http,grpc]' openai numpy
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(tritonclient|openai|numpy|grpcio|protobuf) '

model=${KILN_MODEL_DIR:-models/local/all-MiniLM-L6-v2}
fixtures=${KILN_FIXTURES:-../shared/fixtures}
trap 'stop_kiln || true' EXIT
start_kiln "$model" --model-id all-MiniLM-L6-v2
"$venv/bin/python" scripts/conformance.py --url "$KILN_URL" --fixtures "$fixtures/minilm" --model all-MiniLM-L6-v2
"$venv/bin/python" scripts/conformance_grpc.py --grpc "$KILN_GRPC" --fixtures "$fixtures/minilm" --model all-MiniLM-L6-v2
stop_kiln

# Generation: the same `openai` client against a causal LM, the tiny GPT-2 fixture
# with a ChatML template: a completion, a chat completion and streams of both.
start_kiln "$fixtures/tiny/gpt2-tiny" --model-id gpt2-tiny --chat-template tests/data/chatml.jinja
"$venv/bin/python" scripts/openai-generation.py --url "$KILN_URL" --fixture "$fixtures/tiny/gpt2-tiny" --model gpt2-tiny
stop_kiln

# Several models: one server over a repository folder of the three kinds; both
# tritonclient transports read its index, infer by model name and unload and load a model;
# openai routes by `model`.
repo=$(mktemp -d)
ln -s "$(cd "$model" && pwd)" "$repo/all-MiniLM-L6-v2"
ln -s "$(cd "$fixtures/tiny/bert-tiny-cls" && pwd)" "$repo/bert-tiny-cls"
ln -s "$(cd "$fixtures/tiny/gpt2-tiny" && pwd)" "$repo/gpt2-tiny"
start_kiln_args --model-repository "$repo" --model-control explicit \
  --load-model all-MiniLM-L6-v2,bert-tiny-cls,gpt2-tiny
"$venv/bin/python" scripts/conformance_repository.py --url "$KILN_URL" --grpc "$KILN_GRPC" --fixtures "$fixtures"
stop_kiln
rm -rf "$repo"
trap - EXIT
echo "conformance: OK"
