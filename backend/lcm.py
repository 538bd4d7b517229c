"""Latent consistency distillation (MotionLCM): a one- to four-step sampler with its teacher's many-step quality.

    python -m backend.train lcm --teacher backend/weights/default --data .data/merged --out runs/lcm

The student starts as a copy of the teacher's denoiser plus a zero-initialised guidance-scale embedding, so
classifier-free guidance is folded in (one conditional pass per step instead of two). Each training step
takes a clip's latent z0, noises it to a timestep t of the teacher's DDIM grid (every ``skip`` timesteps),
runs one guided DDIM step of the teacher from t to t - skip, and pulls the student's consistency output at t
towards the target network's (an EMA of the student) at t - skip: every point of a teacher trajectory maps
to the same clean latent. Sampling (``backend.models.consistency.fast_schedule``): predict the clean latent,
noise it to the next timestep, repeat; or, with ``lcm.refine_from``, one student step whose sample the teacher's
guided DDIM refines from that timestep.

With ``lcm.endpoint_weight`` > 0 the student also learns the end of whole teacher trajectories: at the start,
``endpoint_pairs`` training captions (with their clips' lengths and a guidance scale drawn as above) are sampled
by the teacher from seeded noise in ``endpoint_teacher_steps`` guided DDIM steps, and every training step adds
the one-step error of the student from that noise at the top timestep (where one-step sampling starts) to the
teacher's sample. The consistency loss alone reaches that endpoint only through the chain of skip-sized targets.

The run folder is a complete generation checkpoint (the teacher's files) plus ``lcm.safetensors`` and the
``lcm`` section of its config; ``MotionPipeline`` uses the student for requests of at most ``lcm.max_steps``
steps. Ship it by copying those two files beside the teacher's.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from backend.checkpoint import atomic_write, load_config, load_weights, save_json, save_weights
from backend.config import LCMConfig, ModelConfig
from backend.models.consistency import STUDENT_FILE, build_student, consistency_x0, lcm_timesteps
from backend.train import DenoiserTask

TEACHER_FILES = ("vae.safetensors", "Mean.npy", "Std.npy", "denoiser.safetensors", "captions.json",
                 "captions.safetensors")


class LCMTask(DenoiserTask):
    """Consistency distillation of a generation checkpoint (``--teacher DIR``) on its training data.

    The config (``configs/lcm.json`` by default) brings ``train.lcm`` (batch, lr, steps; the data mix
    ``source_repeats`` is the teacher's unless given) and the ``lcm`` section (guidance range, skip, EMA decay,
    max_steps, refine_from); every model section comes from the teacher.
    """

    stage_name = "lcm"

    def __init__(self, config: dict, args: argparse.Namespace, device: torch.device):
        teacher_dir = args.teacher or (config.get("lcm") or {}).get("teacher")
        if not teacher_dir:
            raise ValueError("lcm needs the checkpoint to distil: pass --teacher DIR (e.g. backend/weights/default)")
        teacher_dir = Path(teacher_dir)
        teacher_config = load_config(teacher_dir)
        if teacher_config.get("kind") != "pipeline":
            raise ValueError(f"{teacher_dir} is not a generation checkpoint (kind {teacher_config.get('kind')!r})")
        for key, value in teacher_config.items():
            if key not in ("name", "train", "kind", "step", "lcm", "format"):
                config[key] = value
        config["lcm"] = {**(config.get("lcm") or {}), "teacher": str(teacher_dir.resolve())}
        stage, teacher_stage = config["train"]["lcm"], teacher_config["train"].get("denoiser") or {}
        if stage.get("source_repeats") is None:  # distil on the data mix the teacher learned from
            stage["source_repeats"] = teacher_stage.get("source_repeats")
        args = argparse.Namespace(**{**vars(args), "vae": str(teacher_dir), "text_encoder": None})
        super().__init__(config, args, device)
        self.teacher_dir = teacher_dir
        typed = ModelConfig.from_dict(config)
        self.lcm = typed.lcm or LCMConfig()
        self.teacher = self.model
        load_weights(self.teacher, teacher_dir / "denoiser.safetensors")
        self.teacher.eval().requires_grad_(False)
        self.model = build_student(typed, self.vae.latent_dim, self.text.dim).to(device)
        missing, unexpected = self.model.load_state_dict(self.teacher.state_dict(), strict=False)
        if unexpected or any(not name.startswith("guidance_mlp.") for name in missing):
            raise ValueError(f"{teacher_dir}: the student does not match its teacher ({missing}, {unexpected})")
        self.target = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.endpoints: dict | None = None  # the teacher's (noise, sample) pairs, made at the first step

    def guided_teacher(self, x: torch.Tensor, t: torch.Tensor, cond: tuple, mask: torch.Tensor,
                       w: torch.Tensor) -> torch.Tensor:
        """The teacher's output at x_t with classifier-free guidance ``w`` (B,): one batch of both halves."""
        b = x.shape[0]
        both = self.teacher(x.repeat(2, 1, 1), t.repeat(2), *(c.repeat(2, *[1] * (c.dim() - 1)) for c in cond),
                            torch.arange(2 * b, device=self.device) >= b, mask.repeat(2, 1)).float()
        cond_out, uncond_out = both.chunk(2)
        return uncond_out + w.view(-1, 1, 1) * (cond_out - uncond_out)

    def _guidance(self, b: int) -> torch.Tensor:
        return (self.lcm.guidance_min + (self.lcm.guidance_max - self.lcm.guidance_min) * torch.rand(b)).to(self.device)

    @torch.no_grad()
    def make_endpoints(self) -> dict:
        """``endpoint_pairs`` training clips' captions sampled by the teacher (guided DDIM from seeded noise, at
        the clips' latent lengths): noise, samples (scaled latents), masks, guidance scales and captions."""
        count, batch = self.lcm.endpoint_pairs, self.stage.batch_size
        n = len(self.dataset)  # every clip once before any comes again (with new noise)
        picks = torch.cat([torch.randperm(n) for _ in range(-(-count // n))])[:count].tolist()
        noise, samples, masks, scales, captions = [], [], [], [], []
        for start in range(0, len(picks), batch):
            items = [self.dataset[i] for i in picks[start: start + batch]]
            x0, mask = self.batch(items)  # only for the lengths (crops of at most max_frames)
            text = self.text([item["caption"] for item in items])
            cond, w = (text.tokens, text.mask, text.pooled), self._guidance(len(items))
            x = torch.randn(x0.shape).to(self.device) * mask[..., None]
            noise.append(x)
            timesteps = self.diffusion.ddim_timesteps(self.lcm.endpoint_teacher_steps)
            for i, t in enumerate(timesteps):
                t_batch = torch.full((len(items),), t, dtype=torch.long, device=self.device)
                out = self.guided_teacher(x, t_batch, cond, mask, w)
                x = self.diffusion.ddim_step(out, x, t, timesteps[i + 1] if i + 1 < len(timesteps) else None)
            samples.append(x * mask[..., None])
            masks.append(mask)
            scales.append(w)
            captions += [item["caption"] for item in items]
        pad = max(m.shape[1] for m in masks)

        def padded(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, pad - p.shape[1])) for p in parts])

        return {"noise": padded(noise).cpu(), "sample": padded(samples).cpu(), "mask": padded(masks).cpu(),
                "guidance": torch.cat(scales).cpu(), "captions": captions}

    def endpoint_loss(self, model: nn.Module, b: int) -> torch.Tensor:
        """Mean squared one-step error of the student on ``b`` random teacher pairs."""
        if self.endpoints is None:
            self.endpoints = self.make_endpoints()
        e = self.endpoints
        pick = torch.randint(0, len(e["captions"]), (b,))
        mask = e["mask"][pick].to(self.device)
        keep = mask.any(0)  # drop the padding no pick needs
        mask, noise = mask[:, keep], e["noise"][pick][:, keep].to(self.device)
        text = self.text([e["captions"][i] for i in pick.tolist()])
        top = lcm_timesteps(1, self.lcm.skip, self.diffusion.num_timesteps)[0]
        t = torch.full((b,), top, dtype=torch.long, device=self.device)
        out = model(noise, t, text.tokens, text.mask, text.pooled, None, mask, e["guidance"][pick].to(self.device))
        err = (consistency_x0(self.diffusion, out.float(), noise, t) - e["sample"][pick][:, keep].to(self.device))
        err = err.pow(2).mean(-1)
        return (err * mask).sum() / mask.sum()

    def loss(self, model: nn.Module, items: list[dict]) -> dict[str, torch.Tensor]:
        self._update_target()
        x0, mask = self.batch(items)
        text = self.text([item["caption"] for item in items])
        cond = (text.tokens, text.mask, text.pooled)
        b, diffusion, skip = x0.shape[0], self.diffusion, self.lcm.skip
        t = (torch.randint(1, diffusion.num_timesteps // skip + 1, (b,)) * skip - 1).to(self.device)
        t_prev = (t - skip).clamp(min=0)
        w = self._guidance(b)
        xt = diffusion.add_noise(x0, torch.randn(x0.shape).to(self.device), t)
        with torch.no_grad():  # one guided DDIM step of the teacher, then the target network there
            x0_teacher, eps_teacher = diffusion.split(self.guided_teacher(xt, t, cond, mask, w), xt, t)
            x_prev = diffusion.add_noise(x0_teacher, eps_teacher, t_prev)
            target = consistency_x0(diffusion, self.target(x_prev, t_prev, *cond, None, mask, w).float(), x_prev,
                                    t_prev)
        student = consistency_x0(diffusion, model(xt, t, *cond, None, mask, w).float(), xt, t)
        err = (student - target).pow(2).mean(-1)
        consistency = (err * mask).sum() / mask.sum()
        if self.lcm.endpoint_weight <= 0:
            return {"loss": consistency}
        endpoint = self.endpoint_loss(model, b)
        return {"loss": consistency + self.lcm.endpoint_weight * endpoint, "consistency": consistency,
                "endpoint": endpoint}

    @torch.no_grad()
    def _update_target(self) -> None:
        """target <- ema target + (1 - ema) student (before each step, so step 0's target is the teacher)."""
        for p_target, p in zip(self.target.parameters(), self.model.parameters()):
            p_target.lerp_(p.detach(), 1.0 - self.lcm.ema)

    def export(self, folder: Path, step: int) -> None:
        for name in TEACHER_FILES:  # the folder is the teacher's complete checkpoint, plus the student
            if (self.teacher_dir / name).is_file():
                atomic_write(folder / name, (self.teacher_dir / name).read_bytes())
        save_weights(folder / STUDENT_FILE, self.model, {"step": str(step)})
        teacher_config = load_config(self.teacher_dir)
        save_json(folder / "config.json", {**teacher_config, "lcm": {**self.config["lcm"], "step": step},
                                           "train": {**teacher_config["train"], "lcm": self.config["train"]["lcm"]}})

    def extra_state(self) -> dict:
        return {**super().extra_state(), "target": self.target.state_dict(), "endpoints": self.endpoints}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.target.load_state_dict(state["target"])
        self.endpoints = state.get("endpoints")
