"""The MLD-style baseline denoiser (Chen et al., "Executing your Commands via Motion Diffusion in Latent Space",
CVPR 2023): a transformer encoder with long skip connections (MLD's ``SkipTransformerEncoder``) over the
latent tokens, conditioned in context: a timestep token and the text (pooled sentence token + word tokens) are
prepended to the sequence and every layer attends over all of it.

Deviation from MLD: MLD denoises a single latent token (or a handful); here it denoises the same temporal
latent (B, N, C) as the Motion Mamba U-Net, with sinusoidal positions, so both models share one VAE and the
length-scaling study compares like with like (self-attention makes this model quadratic in N).
Same interface as every denoiser of :mod:`backend.models.denoiser`; registered as ``arch = "mld_transformer"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backend.config import MLDTransformerConfig
from backend.models.denoiser import TextCondition, register_denoiser, timestep_embedding


def positional_encoding(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal positions (length, dim) for any length (no maximum)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return pe


def _layer(d_model: int, heads: int, ff_dim: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        d_model, heads, ff_dim, dropout, activation="gelu", batch_first=True, norm_first=True
    )


@register_denoiser("mld_transformer")
class TransformerDenoiser(nn.Module):
    """MLD's skip transformer: ``layers`` (odd) pre-norm encoder layers, the first (layers-1)/2 feeding the last
    (layers-1)/2 through skip connections (concatenate + linear), one in the middle.

    Config (``backend.config.MLDTransformerConfig``): ``d_model``, ``layers`` (odd), ``heads``, ``ff_dim``
    (None: 4 * d_model), ``dropout``.
    """

    def __init__(self, config: MLDTransformerConfig, latent_dim: int, text_dim: int):
        super().__init__()
        d_model, layers, heads, dropout = config.d_model, config.layers, config.heads, config.dropout
        ff_dim = 4 * d_model if config.ff_dim is None else config.ff_dim
        if layers < 1 or layers % 2 == 0:
            raise ValueError(f"mld_transformer: layers must be odd and >= 1, got {layers}")
        if d_model % heads or d_model % 2:
            raise ValueError(f"mld_transformer: d_model ({d_model}) must be even and divisible by heads ({heads})")
        self.d_model = d_model
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.text = TextCondition(text_dim, d_model)
        self.inp = nn.Linear(latent_dim, d_model)
        half = (layers - 1) // 2
        self.input_blocks = nn.ModuleList(_layer(d_model, heads, ff_dim, dropout) for _ in range(half))
        self.middle_block = _layer(d_model, heads, ff_dim, dropout)
        self.output_blocks = nn.ModuleList(_layer(d_model, heads, ff_dim, dropout) for _ in range(half))
        self.skip_linears = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(half))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        pooled: torch.Tensor,
        drop: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, N, C), t (B,), text tokens (B, S, Dt) + mask (B, S) True = real, pooled (B, Dt),
        drop (B,) bool (classifier-free guidance), mask (B, N) True = valid latent token -> (B, N, C)."""
        batch, n, _ = x.shape
        text, text_padding, pooled_c = self.text(tokens, token_mask, pooled, drop)
        time = self.time_mlp(timestep_embedding(t, self.d_model))
        cond = torch.cat([time[:, None], pooled_c[:, None], text], dim=1)
        latent = self.inp(x) + positional_encoding(n, self.d_model, x.device).to(x.dtype)
        h = torch.cat([cond, latent], dim=1)
        latent_padding = torch.zeros(batch, n, dtype=torch.bool, device=x.device) if mask is None else ~mask
        cond_padding = torch.cat([torch.zeros(batch, 2, dtype=torch.bool, device=x.device), text_padding], dim=1)
        padding = torch.cat([cond_padding, latent_padding], dim=1)
        skips = []
        for block in self.input_blocks:
            h = block(h, src_key_padding_mask=padding)
            skips.append(h)
        h = self.middle_block(h, src_key_padding_mask=padding)
        for block, linear in zip(self.output_blocks, self.skip_linears):
            h = block(linear(torch.cat([h, skips.pop()], dim=-1)), src_key_padding_mask=padding)
        return self.out(self.norm(h[:, cond.shape[1] :]))
