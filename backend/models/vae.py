"""Motion VAE: normalised features (B, T, D) <-> a temporal latent (B, T/4, C), decoded window by window.

The encoder and decoder are Mamba stacks along time (alternating scan direction, so every frame sees both
its past and its future) with strided convolutions between them (x2 down twice; transposed convolutions
x2 up twice). The decoder only ever decodes a *window* of latent tokens plus a few tokens of context on
each side; neighbouring windows' frames cross-fade over the context they share (a window's weight falls
linearly to 0 across its context), so no seam shows where one window ends and the next begins. Training and
inference use that same windowed path, so a streamed decode is exactly the whole one and its cost is linear
in the length.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from backend.config import ModelConfig, VAEConfig
from backend.models.blocks import HierarchicalTemporalMamba

DOWNSAMPLE = 4  # frames per latent token
DECODE_BATCH = 16  # decode windows (times the batch's samples) run in one call at most


class TemporalMamba(nn.Module):
    """``layers`` Mamba scans along time, alternating forwards and backwards; (B, L, d) -> (B, L, d).

    ``scans_per_layer`` scans per direction (a Hierarchical Temporal Mamba block each); a padding mask
    (B, L) True = valid keeps padded frames out of the valid ones in both directions.
    """

    def __init__(self, d_model: int, layers: int, scans_per_layer: int = 1, d_state: int = 16, expand: float = 2):
        super().__init__()
        self.blocks = nn.ModuleList(HierarchicalTemporalMamba(d_model, scans_per_layer, d_state=d_state,
                                                              expand=expand) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i % 2:
                x = block(x.flip(1), None if mask is None else mask.flip(1)).flip(1)
            else:
                x = block(x, mask)
        return x


class _Conv(nn.Module):
    """A (transposed) strided 1-D convolution on (B, L, d) tensors: x2 down or x2 up in time."""

    def __init__(self, d_in: int, d_out: int, up: bool):
        super().__init__()
        conv = nn.ConvTranspose1d if up else nn.Conv1d
        self.conv = conv(d_in, d_out, kernel_size=4, stride=2, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x.transpose(1, 2)).transpose(1, 2))


class MotionVAE(nn.Module):
    """KL-regularised VAE with a temporal latent of ``latent_dim`` channels per 4 frames.

    Config (``backend.config.VAEConfig``, whose defaults these are): ``feature_dim``, ``latent_dim``, ``width``,
    ``layers`` (Mamba layers per resolution), ``d_state``, ``expand``, ``window`` (latent tokens decoded per
    window), ``context`` (extra tokens each side).
    """

    def __init__(self, feature_dim: int = ModelConfig.feature_dim, latent_dim: int = VAEConfig.latent_dim,
                 width: int = VAEConfig.width, layers: int = VAEConfig.layers, d_state: int = VAEConfig.d_state,
                 expand: float = VAEConfig.expand, window: int = VAEConfig.window, context: int = VAEConfig.context):
        super().__init__()
        if window < 1 or context < 0:
            raise ValueError(f"window must be >= 1 and context >= 0, got {window}, {context}")
        self.feature_dim, self.latent_dim = feature_dim, latent_dim
        self.window, self.context = window, context

        def mamba() -> TemporalMamba:
            return TemporalMamba(width, layers, d_state=d_state, expand=expand)

        self.enc_in = nn.Linear(feature_dim, width)
        self.enc = nn.ModuleList([mamba(), _Conv(width, width, up=False), mamba(), _Conv(width, width, up=False),
                                  mamba()])
        self.enc_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, width)
        self.dec = nn.ModuleList([mamba(), _Conv(width, width, up=True), mamba(), _Conv(width, width, up=True),
                                  mamba()])
        self.dec_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, feature_dim))

    @classmethod
    def from_config(cls, config: ModelConfig) -> MotionVAE:
        """From a typed model config (its ``feature_dim`` and ``vae`` section)."""
        if config.vae is None:
            raise ValueError(f"config {config.name!r} has no vae section")
        return cls(feature_dim=config.feature_dim, **asdict(config.vae))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) normalised, T a multiple of 4 -> (mu, logvar), each (B, T/4, latent_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.feature_dim or x.shape[1] % DOWNSAMPLE or x.shape[1] == 0:
            raise ValueError(f"expected (batch, frames, {self.feature_dim}) with frames a positive multiple of "
                             f"{DOWNSAMPLE}, got {tuple(x.shape)}")
        h = self.enc_in(x)
        for layer in self.enc:
            h = layer(h)
        mu, logvar = self.enc_out(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def windows(self, tokens: int) -> list[tuple[int, int]]:
        """The decode windows [start, stop) (in latent tokens) covering ``tokens`` tokens."""
        return [(s, min(s + self.window, tokens)) for s in range(0, tokens, self.window)]

    def decode_window(self, z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Frames 4*start .. 4*stop of the motion for latent z (B, N, C) -> (B, 4 * (stop - start), D); they
        read tokens from one window and its context before ``start`` to one window and its context after
        ``stop`` (the neighbours they cross-fade with)."""
        return self.decode(z, [(start, stop)])

    def _span(self, window: tuple[int, int], tokens: int) -> tuple[int, int]:
        """The tokens [lo, hi) a window reads: its own plus ``context`` each side, inside the latent."""
        return max(0, window[0] - self.context), min(tokens, window[1] + self.context)

    def _fade(self, window: tuple[int, int], span: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A window's blending weight on each frame of its span: 1 on its own frames, falling linearly to 0
        across the context on each side (frame centres, so never exactly 0 inside the span)."""
        (a, b), (lo, hi) = window, span
        t = torch.arange(DOWNSAMPLE * lo, DOWNSAMPLE * hi, device=like.device, dtype=like.dtype) + 0.5
        w = torch.ones_like(t)
        if lo < a:
            w = torch.minimum(w, (t - DOWNSAMPLE * lo) / (DOWNSAMPLE * (a - lo)))
        if hi > b:
            w = torch.minimum(w, (DOWNSAMPLE * hi - t) / (DOWNSAMPLE * (hi - b)))
        return w

    def decode(self, z: torch.Tensor, windows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Latent (B, N, C) -> the frames of ``windows`` (token ranges; default: all of :meth:`windows`, giving
        (B, 4N, D)), concatenated in order: each frame the weighted mean of the decode windows whose spans
        cover it (:meth:`_fade`). Only the windows those frames need are decoded; windows reading equally many
        tokens run together, ``DECODE_BATCH`` at a time: memory stays flat in the length."""
        n = z.shape[1]
        grid = self.windows(n)
        windows = grid if windows is None else windows
        spans = [self._span(w, n) for w in grid]
        wanted = [i for i, (lo, hi) in enumerate(spans) if any(lo < b and a < hi for a, b in windows)]
        first = min(spans[i][0] for i in wanted)
        frames = DOWNSAMPLE * (max(spans[i][1] for i in wanted) - first)
        total = z.new_zeros(z.shape[0], frames, self.feature_dim)
        weight = z.new_zeros(frames, 1)
        by_length: dict[int, list[int]] = {}
        for i in wanted:
            by_length.setdefault(spans[i][1] - spans[i][0], []).append(i)
        per_call = max(1, DECODE_BATCH // z.shape[0])
        for same in by_length.values():
            for start in range(0, len(same), per_call):
                group = same[start: start + per_call]
                h = self.dec_in(torch.cat([z[:, spans[i][0]: spans[i][1]] for i in group]))
                for layer in self.dec:
                    h = layer(h)
                for i, out in zip(group, self.dec_out(h).split(z.shape[0])):
                    lo, hi = (DOWNSAMPLE * (k - first) for k in spans[i])
                    fade = self._fade(grid[i], spans[i], out)[:, None]
                    total[:, lo:hi] += out * fade
                    weight[lo:hi] += fade
        blended = total / weight
        return torch.cat([blended[:, DOWNSAMPLE * (a - first): DOWNSAMPLE * (b - first)] for a, b in windows], dim=1)

    def forward(self, x: torch.Tensor, kl_weight: float = 1e-4, acc_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Training losses for a batch x (B, T, D): reconstruction (MSE, plus MSE of frame-to-frame
        velocities, plus acc_weight * MSE of second differences: frame-to-frame jitter, which the eye sees and
        jerk measures) + kl_weight * KL(q(z|x) || N(0, I)); returns {"loss", "recon", "vel", "acc", "kl"}."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = self.decode(z)
        recon = nn.functional.mse_loss(rec, x)
        vel = nn.functional.mse_loss(rec[:, 1:] - rec[:, :-1], x[:, 1:] - x[:, :-1])
        acc = nn.functional.mse_loss(rec.diff(n=2, dim=1), x.diff(n=2, dim=1))
        mu, logvar = mu.float(), logvar.float()  # the KL in float32 also under bf16 autocast
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return {"loss": recon + vel + acc_weight * acc + kl_weight * kl, "recon": recon, "vel": vel, "acc": acc,
                "kl": kl}
