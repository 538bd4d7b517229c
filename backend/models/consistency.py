"""The consistency sampler of a distilled student (``backend.lcm`` trains it): its timesteps (alone, or followed by
its teacher's refinement), its clean-latent estimate and its architecture (the teacher's, with a guidance-scale
input)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from backend.config import ModelConfig
from backend.models.denoiser import build_denoiser
from backend.models.diffusion import Diffusion

SIGMA_DATA = 0.5  # the consistency boundary condition of LCM: c_skip(0) = 1, c_out(0) = 0
TIMESTEP_SCALING = 10.0
STUDENT_FILE = "lcm.safetensors"  # the student's weights, beside its teacher's in a checkpoint folder


def build_student(config: ModelConfig, latent_dim: int, text_dim: int) -> nn.Module:
    """The teacher's denoiser architecture with a guidance-scale input (motion_mamba denoisers only)."""
    if config.denoiser is None or config.denoiser.arch != "motion_mamba":
        arch = None if config.denoiser is None else config.denoiser.arch
        raise ValueError(f"consistency distillation needs a motion_mamba denoiser, not {arch!r}")
    return build_denoiser(replace(config.denoiser, guidance_embed=True), latent_dim, text_dim)


def consistency_x0(diffusion: Diffusion, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The student's clean-latent estimate at ``x_t``: c_skip(t) x_t + c_out(t) x0(output)."""
    x0, _ = diffusion.split(output, x, t)
    scaled = t.to(x.dtype) * TIMESTEP_SCALING
    shape = (-1,) + (1,) * (x.dim() - 1)
    c_skip = (SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)).view(shape)
    c_out = (scaled / (scaled**2 + SIGMA_DATA**2).sqrt()).view(shape)
    return c_skip * x + c_out * x0


def lcm_timesteps(steps: int, skip: int, num_timesteps: int) -> list[int]:
    """``steps`` timesteps of the distillation grid (``skip``-1, 2 ``skip``-1, ..., T-1), evenly spread from
    the top (LCM's schedule): 1 -> [999], 2 -> [999, 499], 4 -> [999, 759, 519, 279] for skip 20, T 1000."""
    grid = list(range(num_timesteps - 1, 0, -skip))
    if not 1 <= steps <= len(grid):
        raise ValueError(f"the consistency sampler takes 1..{len(grid)} steps, got {steps}")
    return grid[:: len(grid) // steps][:steps]


def fast_schedule(steps: int, skip: int, num_timesteps: int, refine_from: int = 0) -> list[tuple[int, bool]]:
    """The fast sampler's ``steps`` steps as (timestep, by the student?) pairs.

    ``refine_from`` 0: the student's multistep consistency schedule (:func:`lcm_timesteps`). Otherwise one student
    step from the top, then ``steps`` - 1 guided DDIM steps of the teacher from ``refine_from`` evenly down to 0
    (the student's sample noised to that level and refined): 2 steps, refine_from 200 -> [(999, True),
    (200, False)]; 4 steps -> [(999, True), (200, False), (133, False), (67, False)]."""
    if not refine_from:
        return [(t, True) for t in lcm_timesteps(steps, skip, num_timesteps)]
    if not 0 < refine_from < num_timesteps:
        raise ValueError(f"refine_from must be a timestep in 1..{num_timesteps - 1}, got {refine_from}")
    if steps < 1:
        raise ValueError(f"the fast sampler takes at least 1 step, got {steps}")
    top = lcm_timesteps(1, skip, num_timesteps)[0]
    return [(top, True)] + [(round(refine_from * k / (steps - 1)), False) for k in range(steps - 1, 0, -1)]
