"""Latent denoisers, built through a small factory keyed by ``config["arch"]``.

Every denoiser maps ``(x_t (B, N, C), t (B,), tokens (B, S, Dt), token_mask (B, S), pooled (B, Dt),
drop (B,) bool | None, mask (B, N) bool | None) -> (B, N, C)``; ``drop`` marks the samples whose text
condition is replaced by the learned "no text" embedding (classifier-free guidance), ``mask`` marks valid
latent tokens (True) when a batch is padded.

Registering another architecture (e.g. the evaluation's MLD-style transformer)::

    @register_denoiser("mld_transformer")
    class TransformerDenoiser(nn.Module):
        def __init__(self, config: MLDTransformerConfig, latent_dim: int, text_dim: int): ...

in ``backend/models/transformer_denoiser.py``; ``build_denoiser`` imports that module on first use. An
architecture's config is its typed section in ``backend.config`` (an unknown one gets the dict as given).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from backend.config import DENOISERS as SECTIONS
from backend.config import MotionMambaConfig, denoiser_config
from backend.models.blocks import BidirectionalSpatialMamba, HierarchicalTemporalMamba

DENOISERS: dict[str, type[nn.Module]] = {}
# Architectures whose module registers itself on import (kept out of this file's imports).
_LAZY_MODULES = {"mld_transformer": "backend.models.transformer_denoiser"}


def register_denoiser(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``build_denoiser({"arch": name, ...})`` build this class."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        DENOISERS[name] = cls
        return cls

    return wrap


def build_denoiser(config: Any, latent_dim: int, text_dim: int) -> nn.Module:
    """Build the denoiser named by the ``arch`` of ``config``, a typed ``denoiser`` section or its dict (read
    into the section, so defaults are filled and unknown keys rejected); ValueError for an unknown arch."""
    arch = config.get("arch") if isinstance(config, dict) else config.arch
    if arch not in DENOISERS and arch in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[arch])
    if arch not in DENOISERS:
        raise ValueError(f"unknown denoiser arch {arch!r}; known: {sorted(set(DENOISERS) | set(_LAZY_MODULES))}")
    if isinstance(config, dict) and arch in SECTIONS:
        config = denoiser_config(config)
    return DENOISERS[arch](config, latent_dim, text_dim)


GUIDANCE_EMBED_SCALE = 1000.0  # guidance scale w enters the sinusoidal embedding as 1000 w (as in LCM)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TextCondition(nn.Module):
    """Projects text to the model width and swaps in learned "no text" embeddings where ``drop`` is set.

    Returns (tokens (B, S', d), key_padding_mask (B, S') True = padding, pooled (B, d)).
    """

    def __init__(self, text_dim: int, d_model: int):
        super().__init__()
        self.null_pooled = nn.Parameter(torch.zeros(text_dim))
        self.null_token = nn.Parameter(torch.zeros(text_dim))
        self.token_proj = nn.Linear(text_dim, d_model)
        self.pooled_proj = nn.Linear(text_dim, d_model)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor, pooled: torch.Tensor,
                drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if drop is not None:  # always in training, so the null embeddings take part in every step (DDP)
            keep = ~drop
            pooled = torch.where(keep[:, None], pooled, self.null_pooled.to(pooled.dtype))
            tokens = torch.where(keep[:, None, None], tokens, self.null_token.to(tokens.dtype))
            first = torch.zeros_like(token_mask)
            first[:, 0] = True
            token_mask = torch.where(keep[:, None], token_mask, first)
        return self.token_proj(tokens), ~token_mask, self.pooled_proj(pooled)


def _zero_padding(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded tokens before a convolution, so a padded batch sees what an unpadded one sees."""
    return h if mask is None else h * mask[..., None].to(h.dtype)


class _FiLM(nn.Module):
    """x * (1 + scale(c)) + shift(c), zero-initialised (identity at the start of training)."""

    def __init__(self, d_cond: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_cond, 2 * d_model)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(c)[:, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


class MambaLevel(nn.Module):
    """One U-Net level: FiLM conditioning, an HTM block (``num_scans`` temporal scans, run on the reversed
    sequence when ``reverse``) and a BSM block."""

    def __init__(self, d_model: int, d_cond: int, num_scans: int, groups: int, d_state: int, expand: float,
                 reverse: bool):
        super().__init__()
        self.film = _FiLM(d_cond, d_model)
        self.htm = HierarchicalTemporalMamba(d_model, num_scans, d_state=d_state, expand=expand)
        self.bsm = BidirectionalSpatialMamba(d_model, num_groups=groups, d_state=d_state, expand=expand)
        self.reverse = reverse

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.film(x, c)
        if self.reverse:
            x = self.htm(x.flip(1), None if mask is None else mask.flip(1)).flip(1)
        else:
            x = self.htm(x, mask)
        return self.bsm(x, mask)


class AttentionMixer(nn.Module):
    """Bottleneck mixer: self-attention over the latent, cross-attention to the text tokens, an MLP;
    pre-norm residual blocks, FiLM-conditioned."""

    def __init__(self, d_model: int, d_cond: int, heads: int):
        super().__init__()
        self.film = _FiLM(d_cond, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, text: torch.Tensor,
                text_padding: torch.Tensor) -> torch.Tensor:
        x = self.film(x, c)
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
        h = self.norm2(x)
        x = x + self.cross_attn(h, text, text, key_padding_mask=text_padding, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


@register_denoiser("motion_mamba")
class MotionMambaUNet(nn.Module):
    """The Motion Mamba U-Net over the temporal latent.

    Levels ``0..K-1`` with widths ``dims[k]`` and HTM scan counts ``scans[k]`` (more at the high-resolution
    levels). Encoder levels end in a stride-2 convolution (length ceil(N/2)); the bottleneck (last level)
    adds the attention mixer; decoder levels upsample, take the encoder's skip connection and run their HTM
    on the reversed sequence (the encoder scans forwards), so every token sees the whole motion.
    Conditioning: sinusoidal timestep MLP + projected pooled text -> FiLM at every level; text tokens feed
    the bottleneck's cross-attention. Config (``backend.config.MotionMambaConfig``): ``dims``, ``scans``,
    ``groups`` (BSM groups), ``heads``, ``d_state``, ``expand``, ``guidance_embed`` (a consistency-distilled
    student: the guidance scale's embedding joins the timestep's, zero-initialised so it starts as its teacher).
    """

    def __init__(self, config: MotionMambaConfig, latent_dim: int, text_dim: int):
        super().__init__()
        dims, scans = list(config.dims), list(config.scans)
        if len(dims) != len(scans) or len(dims) < 1:
            raise ValueError(f"dims {dims} and scans {scans} must be equally long (>= 1 level)")
        groups, heads, d_state, expand = config.groups, config.heads, config.d_state, config.expand
        d_cond = dims[-1]
        self.time_dim = dims[0]
        self.time_mlp = nn.Sequential(nn.Linear(dims[0], d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))
        self.guidance_mlp = None
        if config.guidance_embed:
            self.guidance_mlp = nn.Sequential(nn.Linear(dims[0], d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)
        self.text = TextCondition(text_dim, d_cond)
        self.cond_act = nn.SiLU()
        self.inp = nn.Linear(latent_dim, dims[0])

        def level(k: int, reverse: bool) -> MambaLevel:
            return MambaLevel(dims[k], d_cond, scans[k], groups, d_state, expand, reverse)

        last = len(dims) - 1
        self.down_levels = nn.ModuleList(level(k, False) for k in range(last))
        self.downs = nn.ModuleList(nn.Conv1d(dims[k], dims[k + 1], 3, stride=2, padding=1) for k in range(last))
        self.mid = level(last, False)
        self.mixer = AttentionMixer(dims[last], d_cond, heads)
        self.ups = nn.ModuleList(nn.Conv1d(dims[k + 1], dims[k], 3, padding=1) for k in range(last))
        self.merges = nn.ModuleList(nn.Linear(2 * dims[k], dims[k]) for k in range(last))
        self.up_levels = nn.ModuleList(level(k, True) for k in range(last))
        self.out_norm = nn.LayerNorm(dims[0])
        self.out_film = _FiLM(d_cond, dims[0])
        self.out = nn.Linear(dims[0], latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                pooled: torch.Tensor, drop: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        text, text_padding, pooled_c = self.text(tokens, token_mask, pooled, drop)
        c = self.time_mlp(timestep_embedding(t, self.time_dim)) + pooled_c
        if self.guidance_mlp is not None:
            if guidance is None:
                raise ValueError("this denoiser is a distilled student: pass the guidance scale (B,)")
            c = c + self.guidance_mlp(timestep_embedding(GUIDANCE_EMBED_SCALE * guidance, self.time_dim))
        c = self.cond_act(c)
        h = self.inp(x)
        skips = []
        for lvl, down in zip(self.down_levels, self.downs):
            h = _zero_padding(lvl(h, c, mask), mask)
            skips.append((h, mask))
            h = down(h.transpose(1, 2)).transpose(1, 2)
            mask = None if mask is None else mask[:, ::2]
        h = self.mid(h, c, mask)
        h = _zero_padding(self.mixer(h, c, mask, text, text_padding), mask)
        for k in reversed(range(len(self.up_levels))):
            skip, mask = skips[k]
            h = _zero_padding(h.repeat_interleave(2, dim=1)[:, : skip.shape[1]], mask)
            h = self.ups[k](h.transpose(1, 2)).transpose(1, 2)
            h = self.merges[k](torch.cat([h, skip], dim=-1))
            h = self.up_levels[k](h, c, mask)
        return self.out(self.out_film(self.out_norm(h), c))
