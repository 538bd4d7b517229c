"""The Motion Mamba blocks (Zhang et al., "Motion Mamba: Efficient and Long Sequence Motion Generation with
Hierarchical and Bidirectional Selective SSM", ECCV 2024): Hierarchical Temporal Mamba (HTM) and
Bidirectional Spatial Mamba (BSM). Both map (B, L, d_model) -> (B, L, d_model) with pre-norm and residual
inside, and take an optional padding mask (B, L) bool, True = valid.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.mamba import Mamba, check_mask

__all__ = ["BidirectionalSpatialMamba", "HierarchicalTemporalMamba"]


def _check_input(x: torch.Tensor, d_model: int, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{who}: expected (batch, length, {d_model}), got {tuple(getattr(x, 'shape', ()))}")


class HierarchicalTemporalMamba(nn.Module):
    """HTM: `num_scans` selective scans along time, stacked.

    Follows the paper's HTM (Sec. 3, "Hierarchical Temporal Mamba"): selective scans along the time axis of
    the latent, their number set per U-Net level, more at the high-resolution levels and fewer at the
    abstract ones; the U-Net picks `num_scans` per level. Deviation: the paper runs its scans inside one
    gated block that shares the input projection and convolution; here each scan is a full, standard Mamba
    layer with its own pre-norm (LayerNorm) and residual. That keeps every scan exactly mamba_ssm's layer
    (its fused CUDA kernel on a GPU, one state_dict for CPU and GPU) and trains stably when stacked, for
    a few more parameters per scan.

    Padding (mask (B, L), True = valid): padded frames are identities of every scan (see `Mamba`), so they
    leak into valid frames in neither direction: not forwards, and equally not when a caller scans the
    reversed sequence (padding then leads). Padded frames come out unchanged (the residual only).
    """

    def __init__(self, d_model: int, num_scans: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 **mamba_kwargs):
        super().__init__()
        if not isinstance(num_scans, int) or isinstance(num_scans, bool) or num_scans < 1:
            raise ValueError(f"HierarchicalTemporalMamba: num_scans must be a positive int, got {num_scans!r}")
        self.d_model, self.num_scans = d_model, num_scans
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_scans))
        self.scans = nn.ModuleList(Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)
                                   for _ in range(num_scans))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d_model), mask (B, L) bool True = valid -> (B, L, d_model)."""
        _check_input(x, self.d_model, type(self).__name__)
        check_mask(mask, x)
        for norm, scan in zip(self.norms, self.scans):
            x = x + scan(norm(x), mask=mask)
        return x


class BidirectionalSpatialMamba(nn.Module):
    """BSM: scans the channel ("spatial"/joint) axis of every frame forwards and backwards, and merges.

    Follows the paper's BSM (Sec. 3, "Bidirectional Spatial Mamba"): within each frame the latent is read as a
    sequence along its channel ("spatial") axis and scanned in both directions, and the two directions are
    merged; here they are summed. Deviation, for a practical cost: each frame's d_model channels are split
    into `num_groups` groups ("joints") of d_model / num_groups channels, and the scan runs over the groups
    (sequence length num_groups, batch B * L, a token of d_model / num_groups channels) rather than over
    single scalar channels. The two directions have separate Mamba layers; one pre-norm (LayerNorm over
    d_model) and one residual around both.

    Frames are scanned independently, so padding cannot leak between frames; with a mask, padded frames
    come out unchanged.
    """

    def __init__(self, d_model: int, num_groups: int = 8, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, **mamba_kwargs):
        super().__init__()
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 \
                or not isinstance(d_model, int) or d_model % num_groups:
            raise ValueError(f"BidirectionalSpatialMamba: num_groups ({num_groups!r}) must be a positive int "
                             f"dividing d_model ({d_model!r})")
        self.d_model, self.num_groups = d_model, num_groups
        group_dim = d_model // num_groups
        self.norm = nn.LayerNorm(d_model)
        self.forward_scan = Mamba(group_dim, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)
        self.backward_scan = Mamba(group_dim, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d_model), mask (B, L) bool True = valid -> (B, L, d_model)."""
        _check_input(x, self.d_model, type(self).__name__)
        check_mask(mask, x)
        batch, length, _ = x.shape
        tokens = self.norm(x).reshape(batch * length, self.num_groups, -1)  # (B*L, groups, group_dim)
        merged = self.forward_scan(tokens) + self.backward_scan(tokens.flip(1)).flip(1)
        update = merged.reshape(batch, length, self.d_model)
        if mask is not None:
            update = update * mask[..., None].to(update.dtype)
        return x + update
