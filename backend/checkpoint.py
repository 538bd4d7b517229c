"""Checkpoint folders: JSON config + safetensors weights + normaliser, every file written atomically.

A run folder (``python -m backend.train ... --out RUN_DIR``) holds:
  config.json          {"format", "kind": "vae" | "pipeline", "name", "fps", "feature_dim", "max_seconds",
                        "vae", "denoiser", "diffusion", "text_encoder", "train", "latent_scale", "step"}
  vae.safetensors      the motion VAE
  denoiser.safetensors the denoiser (kind "pipeline" only: the folder is then a complete generation checkpoint)
  Mean.npy, Std.npy    the dataset's feature normaliser
  captions.safetensors, captions.json   what the model knows: its training captions (``backend.coverage``)
  train_state.pt       everything ``--resume`` needs (one file, so a kill can never mix two steps)
Each file is written to a temporary name in the same folder, flushed, then renamed over the old one
(``os.replace``), so a kill at any moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from backend.config import ModelConfig

FORMAT = "motion-mamba/1"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """A module's state_dict as safetensors (tensors made contiguous, shared storage cloned)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write(path, save(tensors, metadata=metadata))


def save_array(path: str | Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    atomic_write(path, buf.getvalue())


def save_state(path: str | Path, state: dict) -> None:
    """Training state (tensors, numbers, strings, lists, dicts only: it loads with ``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


LEGACY_VAE_KEYS = ("window", "context")  # the decode windows of older checkpoints: their weights decode the same


def drop_legacy_keys(config: dict) -> dict:
    """A config (a checkpoint's, or a run's saved training state's) without the keys older versions wrote that
    no longer mean anything (the VAE's decode windows, before it decoded in one causal pass on 2026-11-29)."""
    if isinstance(config.get("vae"), dict):
        for key in LEGACY_VAE_KEYS:
            config["vae"].pop(key, None)
    return config


def load_config(folder: str | Path) -> dict:
    """Read and check ``folder/config.json``; clear errors for a missing folder or a foreign one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Motion Mamba checkpoint: it has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a Motion Mamba checkpoint (config.json format is "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    drop_legacy_keys(config)
    ModelConfig.from_dict(config, str(path))  # every key known and typed, or a ValueError naming it
    return config


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors into ``module``; a file for another architecture or size is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    state = load_file(str(path))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise ValueError(f"{path} does not match the model its config.json describes (a checkpoint from "
                         f"another architecture or size?): {' '.join(first)}") from None


def load_normalizer(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(folder)
    for name in ("Mean.npy", "Std.npy"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name} (the feature normaliser)")
    return np.load(folder / "Mean.npy").astype(np.float32), np.load(folder / "Std.npy").astype(np.float32)


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def read_config_file(name_or_path: str | Path) -> dict:
    """A model/training config: a JSON file path, or the name of one in ``configs/`` ("tiny", "default").

    A config may name another in ``"base"``: it then holds only the top-level sections it changes
    (``"denoiser"``, ``"train"``, ...), each replacing the base's section whole.
    """
    config, seen = {}, []
    while name_or_path is not None:
        path = _config_path(name_or_path)
        if path.resolve() in seen:
            raise ValueError(f"config {path} names itself as a base, through {' -> '.join(map(str, seen))}")
        seen.append(path.resolve())
        try:
            own = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config {path} is not valid JSON: {exc}") from None
        if not isinstance(own, dict):
            raise ValueError(f"config {path} is not a JSON object")
        own.setdefault("name", path.stem)
        name_or_path = own.pop("base", None)
        if name_or_path is not None and Path(name_or_path).suffix:
            name_or_path = path.parent / name_or_path  # a relative base file sits beside the config naming it
        config = own | config
    config["format"] = FORMAT
    ModelConfig.from_dict(config, str(seen[0]))  # every key known and typed, or a ValueError naming it
    return config


def _config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise FileNotFoundError(f"config {name_or_path!r} not found (a .json path, or one of {known})")
    return path
