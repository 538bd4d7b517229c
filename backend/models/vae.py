"""Motion VAE: normalised features (B, T, D) <-> a temporal latent (B, T/4, C).

The encoder is a Mamba stack along time whose layers alternate scan direction (with two or more layers per
resolution every frame sees its past and its future; the shipped one has one, forwards), with strided
convolutions between (x2 down twice). The decoder mirrors it with transposed convolutions (x2 up twice) but
scans forwards only, whatever its layers: it is causal, apart from the up-convolutions reaching one latent token
ahead (``LOOKAHEAD``), so the frames of a prefix of the latent are the whole latent's frames. Decoding is one
pass over the latent, linear in the length; a stream decodes growing prefixes and gets exactly the whole
motion's frames.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from backend.config import ModelConfig, VAEConfig
from backend.models.blocks import HierarchicalTemporalMamba

DOWNSAMPLE = 4  # frames per latent token
LOOKAHEAD = 1  # latent tokens past a frame's own that the decoder reads (its two x2 up-convolutions)
DECODE_FRAMES = 8192  # frames (summed over samples) decoded in one call at most: memory stays flat in the batch


class TemporalMamba(nn.Module):
    """``layers`` Mamba scans along time, alternating forwards and backwards (``causal``: all forwards);
    (B, L, d) -> (B, L, d).

    ``scans_per_layer`` scans per direction (a Hierarchical Temporal Mamba block each); a padding mask
    (B, L) True = valid keeps padded frames out of the valid ones in both directions.
    """

    def __init__(self, d_model: int, layers: int, scans_per_layer: int = 1, d_state: int = 16, expand: float = 2,
                 causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(HierarchicalTemporalMamba(d_model, scans_per_layer, d_state=d_state,
                                                              expand=expand) for _ in range(layers))
        self.causal = causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i % 2 and not self.causal:
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
    ``layers`` (Mamba layers per resolution), ``d_state``, ``expand``.
    """

    def __init__(self, feature_dim: int = ModelConfig.feature_dim, latent_dim: int = VAEConfig.latent_dim,
                 width: int = VAEConfig.width, layers: int = VAEConfig.layers, d_state: int = VAEConfig.d_state,
                 expand: float = VAEConfig.expand):
        super().__init__()
        self.feature_dim, self.latent_dim = feature_dim, latent_dim

        def mamba(causal: bool) -> TemporalMamba:
            return TemporalMamba(width, layers, d_state=d_state, expand=expand, causal=causal)

        self.enc_in = nn.Linear(feature_dim, width)
        self.enc = nn.ModuleList([mamba(False), _Conv(width, width, up=False), mamba(False),
                                  _Conv(width, width, up=False), mamba(False)])
        self.enc_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, width)
        self.dec = nn.ModuleList([mamba(True), _Conv(width, width, up=True), mamba(True), _Conv(width, width, up=True),
                                  mamba(True)])
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

    def decode(self, z: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Latent (B, N, C) -> the frames (B, 4 * stop, D) of its first ``stop`` tokens (default N), in one pass
        over tokens 0 .. stop + ``LOOKAHEAD``: the same frames as decoding the whole latent. Samples go through
        ``DECODE_FRAMES`` frames at a time."""
        n = z.shape[1]
        stop = n if stop is None else stop
        if not 0 < stop <= n:
            raise ValueError(f"stop must be in 1..{n} latent tokens, got {stop}")
        read = z[:, : min(n, stop + LOOKAHEAD)]
        parts = []
        for part in read.split(max(1, DECODE_FRAMES // (DOWNSAMPLE * read.shape[1]))):
            h = self.dec_in(part)
            for layer in self.dec:
                h = layer(h)
            parts.append(self.dec_out(h[:, : DOWNSAMPLE * stop]))
        return torch.cat(parts)

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
