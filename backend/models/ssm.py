"""Selective scan (the S6 recurrence of Mamba) with mamba_ssm's `selective_scan_fn` interface.

    delta' = softplus(delta + delta_bias)            (each step optional)
    x_t    = exp(delta'_t * A) * x_{t-1} + delta'_t * B_t * u_t        (state (batch, d_inner, d_state))
    out_t  = (C_t . x_t + D * u_t) * silu(z_t)

Dispatch: CUDA tensors with mamba_ssm importable -> mamba_ssm's CUDA kernel; anything else -> the project's
CPU scan: the recurrence runs in a small C kernel compiled at first use (backend.models.scan_kernel), with a
hand-written backward (a reverse scan over checkpointed states). Where no C compiler exists, a plain PyTorch
scan with the same hand-written backward takes over, with a logged warning.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from backend.models import scan_kernel

log = logging.getLogger(__name__)

__all__ = ["mamba_ssm_available", "selective_scan"]


@functools.cache
def _mamba_selective_scan_fn():
    """mamba_ssm's CUDA `selective_scan_fn`, or None (it cannot import without its CUDA build)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a CUDA build that fails to load: both mean "not usable"
        log.debug("mamba_ssm not usable: %s", exc)
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when CUDA is present and mamba_ssm's selective-scan kernel imports."""
    return torch.cuda.is_available() and _mamba_selective_scan_fn() is not None


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.is_complex():
            raise ValueError(f"selective_scan: {name} must be real (complex A/B/C are not supported)")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (d_inner={dim}, d_state), got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and t.shape == (batch, dstate, length):
            continue
        if t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (dstate, length) and t.shape[1] > 0 \
                and dim % t.shape[1] == 0:
            continue
        raise ValueError(f"selective_scan: {name} must be (batch={batch}, d_state={dstate}, L={length}) or "
                         f"(batch, groups dividing d_inner, d_state, L), got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (d_inner={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False):
    """mamba_ssm's `selective_scan_fn`: u, delta, z (batch, d_inner, L); A (d_inner, d_state) real;
    B, C (batch, d_state, L) or grouped (batch, groups, d_state, L); D, delta_bias (d_inner,).

    Returns out (batch, d_inner, L) in u's dtype, or (out, last_state (batch, d_inner, d_state) float32) when
    `return_last_state`; as in mamba_ssm, no gradient flows through last_state.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and _mamba_selective_scan_fn() is not None:
        return _mamba_selective_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          return_last_state)
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    groups = B.shape[1] if B.dim() == 4 else 1
    # The scan core wants B, C as (batch, groups, L, d_state): each step reads d_state contiguous numbers.
    B_t = B.float().reshape(u.shape[0], -1, *B.shape[-2:]).transpose(-1, -2).contiguous()
    C_t = C.float().reshape(u.shape[0], -1, *C.shape[-2:]).transpose(-1, -2).contiguous()
    if B_t.shape[1] != C_t.shape[1]:  # B and C grouped differently: give both the finer grouping
        groups = max(B_t.shape[1], C_t.shape[1])
        B_t = B_t.repeat_interleave(groups // B_t.shape[1], dim=1)
        C_t = C_t.repeat_interleave(groups // C_t.shape[1], dim=1)
    y, last_state = _ScanCore.apply(u.contiguous(), delta.contiguous(), A.float().contiguous(), B_t, C_t)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


class _ScanCore(torch.autograd.Function):
    """y_t = C_t . x_t with x_t = exp(delta_t A) x_{t-1} + delta_t u_t B_t; forward and reverse-scan backward.

    u, delta: (b, d, L) float32 contiguous; A: (d, n); B, C: (b, g, L, n), d divisible by g.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        impl = _implementation()
        y, last_state, saved = impl.forward(u, delta, A, B, C)
        ctx.impl = impl
        ctx.save_for_backward(u, delta, A, B, C, saved)
        ctx.mark_non_differentiable(last_state)
        return y, last_state

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, saved = ctx.saved_tensors
        return ctx.impl.backward(u, delta, A, B, C, saved, dy.contiguous())


class _TorchScan:
    """Plain-PyTorch scan: a Python loop over L on (b, d, n) slices; saves every state for the backward."""

    name = "torch"

    @staticmethod
    def _split(u, delta, A, B, C):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        # (b, g, h, L, n) views: row d = group * h + i, B and C broadcast over h.
        shape = (b, g, d // g, L)
        dA = torch.exp(delta.view(*shape, 1) * A.view(1, g, d // g, 1, n))
        return shape, dA, B.unsqueeze(2), C.unsqueeze(2)

    @staticmethod
    def forward(u, delta, A, B, C):
        shape, dA, Bh, Ch = _TorchScan._split(u, delta, A, B, C)
        dBu = (delta * u).view(*shape, 1) * Bh
        states = torch.empty_like(dA)
        x = torch.zeros_like(dA[..., 0, :])
        for t in range(shape[-1]):
            x = dA[..., t, :] * x + dBu[..., t, :]
            states[..., t, :] = x
        y = (states * Ch).sum(-1).view_as(u)
        return y, x.reshape(u.shape[0], u.shape[1], -1), states

    @staticmethod
    def backward(u, delta, A, B, C, states, dy):
        shape, dA, Bh, Ch = _TorchScan._split(u, delta, A, B, C)
        _, g, h, L = shape
        dy = dy.view(*shape, 1)
        grads = torch.empty_like(states)  # dLoss/dx_t, through every later step
        gx = torch.zeros_like(states[..., 0, :])
        for t in range(L - 1, -1, -1):
            gx = dy[..., t, :] * Ch[..., t, :] + (dA[..., t + 1, :] * gx if t + 1 < L else 0)
            grads[..., t, :] = gx
        prev = torch.cat([torch.zeros_like(states[..., :1, :]), states[..., :-1, :]], dim=-2)
        through_a = grads * prev * dA  # dLoss/d(delta_t A) per state
        grad_b = (grads * Bh).sum(-1)  # dLoss/d(delta_t u_t)
        du = (grad_b * delta.view(shape)).view_as(u)
        ddelta = ((through_a * A.view(1, g, h, 1, -1)).sum(-1) + grad_b * u.view(shape)).view_as(u)
        dA_param = (through_a * delta.view(*shape, 1)).sum(dim=(0, 3)).reshape_as(A)
        dB = (grads * (delta * u).view(*shape, 1)).sum(2)
        dC = (dy * states).sum(2)
        return du, ddelta, dA_param, dB, dC


def _choose_implementation():
    """The compiled C kernel when it builds here, else the PyTorch scan (with a warning saying why)."""
    try:
        scan_kernel.load()
    except Exception as exc:  # no compiler, a failed build, or a library that will not load
        log.warning("selective_scan: the compiled CPU scan is unavailable (%s); using the PyTorch scan, "
                    "which is several times slower", exc)
        return _TorchScan
    return scan_kernel.CompiledScan


_implementation = functools.cache(_choose_implementation)
