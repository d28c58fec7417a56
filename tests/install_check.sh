#!/usr/bin/env bash
# A fresh venv (no system site-packages), `pip install ".[recipes]"` from this checkout (a wheel,
# not an editable install), then `slime-train` on the shipped tiny stage I from another folder
# and `slime-chat` on what it saved. Run by `make test-install` (and `make test`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
# torch is named in the same pip command (see the Makefile)
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${TORCH:-torch==2.13.0}" "$ROOT[recipes]"
cd "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
"$WORK/venv/bin/slime-train" --config tiny/stage1.yaml --set training.max_steps=2 \
    --set "data.generate={num: 16, seed: 0, square: 56, clutter: 2}" \
    --set training.progress=false --set training.save_every=0
test -f runs/tiny/stage1/final/config.json
test -f runs/tiny/stage1/final/model.safetensors
"$WORK/venv/bin/slime-chat" --model runs/tiny/stage1/final \
    --image runs/tiny/data/train/img_00000.png --question "what color is the square ?" \
    --max-new-tokens 2 --verbose
# the package holds every shipped configuration and imports only the core without extras used
"$WORK/venv/bin/python" - <<'PY'
import sys
import recipes
names = sorted(p.relative_to(recipes.CONFIGS).as_posix() for p in recipes.CONFIGS.rglob("*.*"))
assert "tiny/stage1.yaml" in names and "deepspeed/zero3.json" in names, names
assert recipes.__file__.find("site-packages") > 0, recipes.__file__
import slime_adapters
assert "transformers" not in sys.modules
PY
# a bad configuration is one line and status 2
if "$WORK/venv/bin/slime-train" --config nowhere.yaml 2> err.txt; then exit 1; fi
test "$(wc -l < err.txt)" -eq 1
echo "install check: ok"
