"""The Mamba layer (Gu & Dao 2023), parameter-compatible with `mamba_ssm.modules.mamba_simple.Mamba`.

Same parameter names, shapes and initialisation as mamba_ssm (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj), so a state_dict saved on a GPU with mamba_ssm loads here on the CPU and vice versa. On CUDA with
mamba_ssm and causal-conv1d installed the forward is mamba_ssm's fused `mamba_inner_fn`; elsewhere it is the
same computation in PyTorch around the project's selective scan (backend.models.ssm).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.models import scan_kernel
from backend.models.ssm import needs_grad, selective_scan, uses_compiled_scan

log = logging.getLogger(__name__)

__all__ = ["Mamba"]


@functools.cache
def _cuda_ops():
    """(mamba_inner_fn, causal_conv1d_fn) from mamba_ssm / causal-conv1d, or None where they do not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception as exc:  # no CUDA build (e.g. any CPU-only machine): use the PyTorch path
        log.debug("mamba_ssm fused ops not usable: %s", exc)
        return None
    return mamba_inner_fn, causal_conv1d_fn


def check_mask(mask: torch.Tensor | None, x: torch.Tensor) -> None:
    """Validate a padding mask (B, L) bool, True = valid, against x (B, L, ...)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (B, L) with True = valid, got {getattr(mask, 'dtype', mask)}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, length) {tuple(x.shape[:2])}")


class Mamba(nn.Module):
    """One Mamba layer: (B, L, d_model) -> (B, L, d_model).

    in_proj -> [x | z]; x -> depthwise causal conv1d -> SiLU -> x_proj -> (dt, B, C); dt -> dt_proj;
    y = selective_scan(x, dt, A=-exp(A_log), B, C, D, z, softplus(dt + dt_bias)); out_proj(y).
    Arguments and initialisation follow mamba_ssm's `Mamba` (dt_rank "auto" = ceil(d_model / 16)).

    `forward(x, mask)`: with a padding mask (B, L) bool (True = valid) the padded steps become exact
    identities of the recurrence (their conv input and their step size delta are zeroed, so
    exp(delta A) = 1 and delta B u = 0): the valid frames get the same output as the unpadded sequence,
    wherever the padding sits, and the output at padded frames is zero.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba: {name} must be a positive int, got {value!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"Mamba: expand * d_model must be >= 1, got {expand} * {d_model}")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"Mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.use_fast_path = use_fast_path

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weights keep the variance at initialisation; bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max] (mamba_ssm's initialisation).
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A = -(1..d_state) per channel, kept as float32 log; D = 1 ("skip").
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _conv_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(``conv1d``) (depthwise, causal) on (B, L, d_inner), keeping the (B, L, d) layout the scan reads
        fastest. Without gradients, where the compiled CPU scan is in use, one fused pass of its kernel (~4x
        faster than the ops below at these sizes); else d_conv shifted multiply-adds (on the CPU about twice as fast
        as the convolution op for these short, narrow sequences)."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and uses_compiled_scan() \
                and not needs_grad(x, self.conv1d.weight, self.conv1d.bias):
            return scan_kernel.conv_silu(x, self.conv1d.weight, self.conv1d.bias)
        length, k = x.shape[1], self.d_conv
        padded = F.pad(x, (0, 0, k - 1, 0))
        weight = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        out = padded[:, :length] * weight[:, 0]
        for i in range(1, k):
            out = out + padded[:, i: i + length] * weight[:, i]
        return F.silu(out if self.conv1d.bias is None else out + self.conv1d.bias)

    def _forward_compiled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The forward without autograd or mask on the compiled CPU kernels, the counterpart of mamba_ssm's fused
        `mamba_inner_fn`: everything stays in (B, L, channels) memory, the convolution and SiLU are one kernel
        pass, the scan reads B and C in place from x_proj's output, and no argument is re-checked (this layer made
        them all). Bit for bit the general path's result; ~2 ms less a denoiser pass at 10 s of motion."""
        x, z = self.in_proj(hidden_states).split(self.d_inner, dim=-1)
        x = scan_kernel.conv_silu(x, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        y, _, _ = scan_kernel.CompiledScan.forward(
            x.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log), B[:, None], C[:, None], self.D,
            z.transpose(1, 2), self.dt_proj.bias, True, for_backward=False)
        return self.out_proj(y.transpose(1, 2))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, L, d_model), optional mask (B, L) bool True = valid -> (B, L, d_model)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: expected (batch, length, {self.d_model}), "
                             f"got {tuple(getattr(hidden_states, 'shape', ()))}")
        check_mask(mask, hidden_states)
        if mask is None and not torch.is_grad_enabled() and hidden_states.device.type == "cpu" \
                and hidden_states.dtype == self.A_log.dtype == torch.float32 and uses_compiled_scan():
            return self._forward_compiled(hidden_states)
        A = -torch.exp(self.A_log.float())
        cuda_ops = _cuda_ops() if hidden_states.is_cuda else None
        if cuda_ops is not None:  # mamba_ssm's kernels want (B, channels, L) with L innermost
            xz = self.in_proj(hidden_states).transpose(1, 2).contiguous()
            if self.use_fast_path and mask is None:
                mamba_inner_fn, _ = cuda_ops
                return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                      self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, None, None,
                                      self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        else:  # the CPU scan reads (B, L, channels) memory fastest: keep it, as (B, channels, L) views
            xz = self.in_proj(hidden_states).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        keep = None if mask is None else mask[:, None, :].to(x.dtype)
        if keep is not None:
            x = x * keep
        if cuda_ops is not None:
            x = cuda_ops[1](x=x, weight=self.conv1d.weight.squeeze(1), bias=self.conv1d.bias, activation="silu")
        else:
            x = self._conv_silu(x.transpose(1, 2)).transpose(1, 2)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L), bias added in the scan
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, d_state, L) views
        if keep is None:
            y = selective_scan(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                               delta_softplus=True)
        else:  # zero step size on padded frames: the state passes through them unchanged
            dt = F.softplus(dt + self.dt_proj.bias.float()[:, None]) * keep
            y = selective_scan(x, dt, A, B, C, self.D.float(), z=z)
        out = self.out_proj(y.transpose(1, 2))
        return out if mask is None else out * mask[..., None].to(out.dtype)
