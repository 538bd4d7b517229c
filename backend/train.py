"""Training: ``python -m backend.train {vae,denoiser,evaluator,lcm} --data DATASET --out RUN_DIR [options]``.

One loop for every model ("task"): AdamW with linear warm-up then cosine decay, gradient clipping, bf16
autocast on CUDA, DistributedDataParallel under ``torchrun`` (NCCL on GPUs, gloo on the CPU), tqdm
progress, a loss curve (CSV + PNG) and atomic checkpoints (see backend.checkpoint). ``--resume`` continues
exactly where the last checkpoint stopped: model, optimiser, scheduler, step, the RNG states of torch,
numpy and Python on every rank, and the data order (a pure function of seed and step).

A task is a class registered in ``TASKS`` ("name" -> "module:Class", imported on first use) with:
  ``__init__(self, config: dict, args: argparse.Namespace, device: torch.device)`` (``config`` is the
  on-disk form the task completes and saves; it reads its values typed: ``ModelConfig.from_dict(config)``)
  ``model``: the nn.Module to optimise; ``dataset``: a sized, indexable dataset of items;
  ``loss(self, model, items: list) -> dict[str, Tensor]`` (key "loss" is optimised; ``model`` is the
  possibly DDP-wrapped ``self.model``: call it, not ``self.model``, so gradients are synchronised);
  ``export(self, folder: Path, step: int)``: write the inference files (weights, config.json, ...);
  ``extra_state(self) -> dict`` / ``load_extra_state(self, state: dict)`` for anything else to resume.
The evaluation's text/motion evaluator registers as "evaluator" -> backend.evaluate:EvaluatorTask.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import io
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from backend.checkpoint import (
    TRAIN_STATE,
    atomic_write,
    drop_legacy_keys,
    load_config,
    load_normalizer,
    load_state,
    load_weights,
    read_config_file,
    save_array,
    save_json,
    save_state,
    save_weights,
)
from backend.config import ModelConfig, StageConfig
from backend.coverage import CaptionIndex
from backend.models.denoiser import build_denoiser
from backend.models.diffusion import Diffusion
from backend.models.text_encoder import TextEncoder
from backend.models.vae import DOWNSAMPLE, MotionVAE

TASKS = {
    "vae": "backend.train:VAETask",
    "denoiser": "backend.train:DenoiserTask",
    "evaluator": "backend.evaluate:EvaluatorTask",
    "lcm": "backend.lcm:LCMTask",
}
DEFAULT_CONFIGS = {"lcm": "lcm"}  # the config a task reads without --config (otherwise "default")


def _dataset(root: str | Path, stage: StageConfig, max_frames: int | None):
    from backend.data.dataset import MotionDataset

    return MotionDataset(root, "train", max_frames=max_frames, unit=DOWNSAMPLE, source_repeats=stage.source_repeats)


class VAETask:
    """The motion VAE on random crops (all clips of a batch cut to one length: no padding)."""

    def __init__(self, config: dict, args: argparse.Namespace, device: torch.device):
        self.config, self.device = config, device
        self.data = Path(args.data)
        from backend.data.dataset import load_normalizer as dataset_normalizer

        self.mean, self.std = dataset_normalizer(self.data)
        config["feature_dim"] = int(self.mean.shape[0])
        typed = ModelConfig.from_dict(config)
        self.stage = typed.train.vae
        self.dataset = _dataset(self.data, self.stage, self.stage.max_frames)
        self.model = MotionVAE.from_config(typed).to(device)

    def loss(self, model: nn.Module, items: list[dict]) -> dict[str, torch.Tensor]:
        x = crop_to_common_length(items).to(self.device)
        return model(x, kl_weight=self.stage.kl_weight, acc_weight=self.stage.acc_weight)

    def export(self, folder: Path, step: int) -> None:
        save_weights(folder / "vae.safetensors", self.model, {"step": str(step)})
        save_array(folder / "Mean.npy", self.mean)
        save_array(folder / "Std.npy", self.std)
        save_json(folder / "config.json", {**self.config, "kind": "vae", "step": step})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class DenoiserTask:
    """The latent denoiser over a trained VAE (``--vae RUN_DIR`` or config train.denoiser.vae).

    Latents are the VAE posterior means of whole clips (computed once per clip, unpadded), scaled by
    ``latent_scale`` (1 / their std, measured at the start); a batch takes random crops of at most
    ``max_frames`` / 4 tokens, pads them and masks the padding. Text embeddings are cached per caption.
    """

    stage_name = "denoiser"  # the train.* section this task reads

    def __init__(self, config: dict, args: argparse.Namespace, device: torch.device):
        self.device = device
        vae_dir = args.vae or ModelConfig.from_dict(config).train.denoiser.vae
        if not vae_dir:
            raise ValueError("the denoiser needs a trained VAE: pass --vae RUN_DIR (a `backend.train vae` run)")
        vae_config = load_config(vae_dir)
        if vae_config.get("kind") not in ("vae", "pipeline"):
            raise ValueError(f"{vae_dir} holds no VAE (kind {vae_config.get('kind')!r})")
        self.vae_dir = Path(vae_dir)
        config["train"][self.stage_name]["vae"] = str(self.vae_dir.resolve())  # recorded: --resume needs no --vae
        config["vae"], config["feature_dim"] = vae_config["vae"], vae_config["feature_dim"]
        if args.text_encoder:
            config["text_encoder"] = {**config.get("text_encoder", {}), "path": str(Path(args.text_encoder))}
        self.config = config
        typed = ModelConfig.from_dict(config)
        self.stage = getattr(typed.train, self.stage_name)
        self.vae = MotionVAE.from_config(typed)
        load_weights(self.vae, self.vae_dir / "vae.safetensors")
        self.vae.to(device).eval().requires_grad_(False)
        self.mean, self.std = load_normalizer(self.vae_dir)
        self.text = TextEncoder(typed.text_encoder.path, typed.text_encoder.max_length,
                                cache_size=None).to(device)
        self.diffusion = Diffusion.from_config(typed.diffusion)
        self.dataset = _dataset(args.data, self.stage, None)
        self.model = build_denoiser(typed.denoiser, self.vae.latent_dim, self.text.dim).to(device)
        self._index = {clip_id: i for i, clip_id in enumerate(self.dataset.ids)}
        self._latents: dict[str, torch.Tensor] = {}
        self.latent_scale = typed.latent_scale
        self.data, self.captions = args.data, None

    @torch.no_grad()
    def _latent(self, clip_id: str) -> torch.Tensor:
        """The whole clip's latent (posterior mean), from its stored features: independent of any random crop,
        so a resumed run rebuilds exactly the same cache."""
        if clip_id not in self._latents:
            data = self.dataset.features[self._index[clip_id]]
            x = torch.as_tensor(data[: data.shape[0] // DOWNSAMPLE * DOWNSAMPLE], dtype=torch.float32)
            self._latents[clip_id] = self.vae.encode(x[None].to(self.device))[0][0].cpu()
        return self._latents[clip_id]

    def _measure_scale(self) -> float:
        """1 / std of the latents of (up to) 64 evenly spread training clips."""
        ids = self.dataset.ids
        picks = sorted({int(i) for i in np.linspace(0, len(ids) - 1, min(len(ids), 64))})
        z = torch.cat([self._latent(ids[i]) for i in picks])
        return float(1.0 / z.std().clamp(min=1e-6))

    def batch(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent crops of ``items``, padded (B, N, C), and their validity mask (B, N)."""
        if self.latent_scale is None:
            self.latent_scale = self._measure_scale()
            self.config["latent_scale"] = self.latent_scale
        max_tokens = max(1, self.stage.max_frames // DOWNSAMPLE)
        crops = []
        for item in items:
            z = self._latent(item["id"])
            if z.shape[0] > max_tokens:
                start = int(torch.randint(0, z.shape[0] - max_tokens + 1, ()))
                z = z[start: start + max_tokens]
            crops.append(z)
        lengths = torch.tensor([z.shape[0] for z in crops])
        x0 = nn.utils.rnn.pad_sequence(crops, batch_first=True).to(self.device) * self.latent_scale
        mask = (torch.arange(x0.shape[1])[None] < lengths[:, None]).to(self.device)
        return x0, mask

    def loss(self, model: nn.Module, items: list[dict]) -> dict[str, torch.Tensor]:
        x0, mask = self.batch(items)
        text = self.text([item["caption"] for item in items])
        b = x0.shape[0]
        drop = (torch.rand(b) < self.stage.cond_drop).to(self.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,)).to(self.device)
        noise = torch.randn(x0.shape).to(self.device)
        xt = self.diffusion.add_noise(x0, noise, t)
        out = model(xt, t, text.tokens, text.mask, text.pooled, drop, mask)
        err = (out.float() - self.diffusion.target(x0, noise, t)).pow(2).mean(-1)
        loss = (err * mask).sum() / mask.sum()
        return {"loss": loss}

    def export(self, folder: Path, step: int) -> None:
        for name in ("vae.safetensors", "Mean.npy", "Std.npy"):  # the folder is a complete checkpoint
            atomic_write(folder / name, (self.vae_dir / name).read_bytes())
        save_weights(folder / "denoiser.safetensors", self.model, {"step": str(step)})
        if self.captions is None:  # what the model knows: its training captions, indexed once
            self.captions = CaptionIndex.build(self.text, self.data)
        self.captions.save(folder)
        if self.config.get("rotation_channels", "auto") == "auto":  # the data's convention, for generation
            self.config["rotation_channels"] = self._rotation_channels()
        save_json(folder / "config.json", {**self.config, "kind": "pipeline", "step": step})

    def _rotation_channels(self) -> str:
        """The rotation-channel convention most of (up to) 16 evenly spread training clips follow."""
        from backend.motion import rotation_channels

        features = self.dataset.features
        picks = sorted({int(i) for i in np.linspace(0, len(features) - 1, min(len(features), 16))})
        votes = [rotation_channels(np.asarray(features[i]) * self.std + self.mean) for i in picks]
        return max(set(votes), key=votes.count)

    def extra_state(self) -> dict:
        return {"latent_scale": self.latent_scale}

    def load_extra_state(self, state: dict) -> None:
        self.latent_scale = state.get("latent_scale")
        if self.latent_scale is not None:
            self.config["latent_scale"] = self.latent_scale


def crop_to_common_length(items: list[dict]) -> torch.Tensor:
    """Cut every clip of a batch to the shortest one's length (a multiple of 4) at a random offset."""
    length = min(int(item["length"]) for item in items) // DOWNSAMPLE * DOWNSAMPLE
    if length < DOWNSAMPLE:
        raise ValueError(f"clips must have at least {DOWNSAMPLE} frames")
    out = []
    for item in items:
        start = int(torch.randint(0, int(item["length"]) - length + 1, ()))
        out.append(item["features"][start: start + length])
    return torch.stack(out).float()


def get_task(kind: str):
    """The task class registered for ``kind`` (imported on first use)."""
    if kind not in TASKS:
        raise ValueError(f"unknown training task {kind!r}; known: {sorted(TASKS)}")
    module, _, name = TASKS[kind].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"training task {kind!r} is not available ({TASKS[kind]}): {exc}") from exc


# --- data order -------------------------------------------------------------------------------------------

def batch_indices(step: int, rank: int, world: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset indices of one rank's batch at ``step``: consecutive slices of a stream of per-epoch
    permutations (seeded by seed + epoch), so the order depends only on (seed, step) and resumes exactly."""
    start = (step * world + rank) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        out.append(_permutation(seed, epoch, n)[i])
    return out


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(seed: int, epoch: int, n: int) -> list[int]:
    key = (seed, epoch, n)
    if key not in _PERMS:
        _PERMS.clear()
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return _PERMS[key]


# --- RNG state --------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Global RNG states of Python, numpy and torch, as tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()  # noqa: NPY002 (the global state datasets may draw from)
    py_version, py_internal, py_gauss = random.getstate()
    state = {"python": [py_version, list(py_internal), py_gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


# --- the loop ---------------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _dist() -> tuple[int, int]:
    """(rank, world_size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _write_curves(folder: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(folder / "loss.csv", buf.getvalue().encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], lw=0.8, label="loss")
    if len(history) >= 20:  # moving average
        w = max(5, len(history) // 50)
        smooth = np.convolve([h["loss"] for h in history], np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    atomic_write(folder / "loss.png", png.getvalue())


def train(kind: str, data: str | Path, out: str | Path, config: str | Path | None = None, resume: bool = False,
          steps: int | None = None, vae: str | Path | None = None, text_encoder: str | Path | None = None,
          device: str = "auto", stop_after: int | None = None, progress: bool = True,
          teacher: str | Path | None = None) -> list[dict]:
    """Train one model; returns the loss history ([{step, loss, ..., lr}], this rank's view).

    ``stop_after`` ends this run after that many steps *without* a final save (tests: a simulated kill).
    """
    args = argparse.Namespace(kind=kind, data=data, out=out, vae=vae, text_encoder=text_encoder, teacher=teacher)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"dataset folder {data} does not exist")
    out = Path(out)
    rank, world = _dist()
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    state = None
    if resume:
        if not (out / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume: {out} has no {TRAIN_STATE} to resume from")
        state = load_state(out / TRAIN_STATE)
        cfg, source = drop_legacy_keys(state["config"]), str(out / TRAIN_STATE)
    else:
        config = config or DEFAULT_CONFIGS.get(kind, "default")
        cfg, source = read_config_file(config), str(config)
    typed = ModelConfig.from_dict(cfg, source)  # ValueError naming an unknown or mistyped key, in any section
    tcfg = getattr(typed.train, kind, None)
    if tcfg is None:
        raise ValueError(f"config {typed.name!r} has no train.{kind} section (batch_size, lr, steps, ...)")
    if steps is not None:
        cfg["train"][kind]["steps"] = int(steps)  # the run's config records it
        tcfg = dataclasses.replace(tcfg, steps=int(steps))
    seed = typed.train.seed
    seed_everything(seed + rank)
    task = get_task(kind)(cfg, args, dev)
    model = task.model
    ddp_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr,
                                  weight_decay=tcfg.weight_decay)
    total = tcfg.steps
    horizon = total if tcfg.schedule_steps is None else tcfg.schedule_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tcfg.warmup, horizon))
    history: list[dict] = []
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.load_extra_state(state["task"])
        step, history = int(state["step"]), list(state["history"])
        if len(state["rng"]) != world:
            raise ValueError(f"{out} was trained with {len(state['rng'])} processes; resume it with as many")
        set_rng_state(state["rng"][rank])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    batch_size, n = tcfg.batch_size, len(task.dataset)
    if n == 0:
        raise ValueError(f"dataset {data} has no training clips")
    save_every = tcfg.save_every
    use_bf16 = dev.type == "cuda"

    def save() -> None:
        states = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if rank == 0:
            task.export(out, step)
            _write_curves(out, history)
            save_state(out / TRAIN_STATE, {
                "config": task.config, "step": step, "history": history, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "task": task.extra_state(), "rng": states})

    bar = tqdm(total=total, initial=step, desc=f"train {kind}", disable=not progress or rank != 0,
               dynamic_ncols=True)
    ran, t0 = 0, time.time()
    model.train()
    while step < total:
        if stop_after is not None and ran >= stop_after:
            bar.close()
            return history
        items = [task.dataset[i] for i in batch_indices(step, rank, world, batch_size, n, seed)]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = task.loss(ddp_model, items)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step, ran = step + 1, ran + 1
        values = torch.stack([v.detach().float() for v in losses.values()])
        if world > 1:
            torch.distributed.all_reduce(values)
            values /= world
        row = {"step": step, **{k: float(v) for k, v in zip(losses, values)},
               "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "seconds": time.time() - t0}
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if step % save_every == 0 or step == total:
            save()
    bar.close()
    if world > 1:
        check_in_sync(model)
    return history


def check_in_sync(model: nn.Module) -> None:
    """DDP: every rank must hold the same parameters (raises RuntimeError otherwise)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"DDP ranks diverged: parameters differ by up to {float((hi - lo).max())}")
    if torch.distributed.get_rank() == 0:
        print(f"ddp: {torch.distributed.get_world_size()} processes, parameters identical on every rank")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.train", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(TASKS), help="what to train")
    parser.add_argument("--data", required=True, help="dataset folder in the HumanML3D layout")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, config, loss curves)")
    parser.add_argument("--config", help="config JSON file or name in configs/ (default: default)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    parser.add_argument("--steps", type=int, help="total training steps (overrides the config)")
    parser.add_argument("--vae", help="denoiser: the VAE run folder")
    parser.add_argument("--text-encoder", help="denoiser: a local Hugging Face text encoder folder")
    parser.add_argument("--teacher", help="lcm: the generation checkpoint to distil (e.g. backend/weights/default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    try:
        history = train(args.kind, args.data, args.out, args.config, args.resume, args.steps, args.vae,
                        args.text_encoder, args.device, teacher=args.teacher)
        if torch.distributed.is_initialized():  # every rank done before any tears the group down: a gloo peer
            torch.distributed.barrier()  # closing mid-teardown aborted the other (seen once in CI under load)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if history and int(os.environ.get("RANK", "0")) == 0:
        first, last = history[0], history[-1]
        print(f"{args.kind}: step {last['step']}, loss {first['loss']:.4f} (step {first['step']}) -> "
              f"{last['loss']:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
