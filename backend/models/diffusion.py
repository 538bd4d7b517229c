"""Noise schedule, DDPM training target and the deterministic DDIM step (the pipeline runs the loop)."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from backend.config import DiffusionConfig

PREDICTIONS = ("epsilon", "v")


class Diffusion:
    """A discrete-time DDPM schedule (``num_timesteps`` steps) with epsilon- or v-prediction.

    Config (``backend.config.DiffusionConfig``, whose defaults these are): ``num_timesteps``, ``beta_schedule``
    ("scaled_linear" | "linear" | "cosine"), ``beta_start`` / ``beta_end`` (the latent-diffusion values),
    ``prediction``.
    """

    def __init__(self, num_timesteps: int = DiffusionConfig.num_timesteps,
                 beta_schedule: str = DiffusionConfig.beta_schedule, beta_start: float = DiffusionConfig.beta_start,
                 beta_end: float = DiffusionConfig.beta_end, prediction: str = DiffusionConfig.prediction):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.num_timesteps = int(num_timesteps)
        self.prediction = prediction
        n = self.num_timesteps
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "cosine":
            s = 0.008
            f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64, (n,)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        """From a typed ``diffusion`` section."""
        return cls(**asdict(config))

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, ``t`` (B,) integer timesteps."""
        sa, sb = self._coefs(t, x0)
        return sa * x0 + sb * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at ``t``: the noise, or v = sqrt(a) noise - sqrt(1-a) x0."""
        if self.prediction == "epsilon":
            return noise
        sa, sb = self._coefs(t, x0)
        return sa * noise - sb * x0

    def split(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network output at ``x_t`` into (x0 estimate, epsilon estimate)."""
        sa, sb = self._coefs(t, x)
        if self.prediction == "epsilon":
            eps = output
            x0 = (x - sb * eps) / sa
        else:
            x0 = sa * x - sb * output
            eps = sb * x + sa * output
        return x0, eps

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T-1 down to 0, evenly spaced ("trailing" spacing: good for few steps)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        ts = torch.linspace(self.num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1].round().long()
        return [int(t) for t in ts]

    @torch.no_grad()
    def ddim_step(self, output: torch.Tensor, x: torch.Tensor, t: int, t_prev: int | None) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0): ``x`` at timestep ``t`` and the network's ``output`` there ->
        ``x`` at ``t_prev``; the last step (``t_prev`` None) returns the x0 estimate. The caller owns the loop
        over ``ddim_timesteps`` (see ``MotionPipeline``)."""
        x0, eps = self.split(output, x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        if t_prev is None:
            return x0
        a_prev = self.alphas_cumprod[t_prev]
        return a_prev.sqrt().to(x.dtype) * x0 + (1 - a_prev).sqrt().to(x.dtype) * eps
