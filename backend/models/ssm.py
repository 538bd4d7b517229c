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
import math

import torch
import torch.nn.functional as F

from backend.models import scan_kernel

log = logging.getLogger(__name__)

__all__ = ["mamba_ssm_available", "needs_grad", "selective_scan", "uses_compiled_scan"]


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
    if u.numel() == 0:
        raise ValueError(f"selective_scan: u must be non-empty, got shape {tuple(u.shape)}")
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
    # The scan wants B, C as (batch, groups, L, d_state) with each step's d_state numbers adjacent: the Mamba layer's
    # x_proj output is that already (read in place); mamba_ssm's (batch, d_state, L) layout gets a copy.
    B_t, C_t = (_steps_adjacent(t.float().reshape(u.shape[0], -1, *t.shape[-2:]).transpose(-1, -2)) for t in (B, C))
    if B_t.shape[1] != C_t.shape[1]:  # B and C grouped differently: give both the common refinement
        groups = math.lcm(B_t.shape[1], C_t.shape[1])
        B_t = B_t.repeat_interleave(groups // B_t.shape[1], dim=1)
        C_t = C_t.repeat_interleave(groups // C_t.shape[1], dim=1)
    D, delta_bias = (None if t is None else t.float().contiguous() for t in (D, delta_bias))
    args = (u.float(), delta.float(), A.float().contiguous(), B_t, C_t, D, None if z is None else z.float(),
            delta_bias, bool(delta_softplus))
    if needs_grad(*args[:-1]):
        out, last_state = _SelectiveScan.apply(*args)
    else:  # inference: the implementation directly (the autograd Function costs ~15 us a call)
        out, last_state, _ = _implementation_for(u).forward(*args, for_backward=False)
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


def _steps_adjacent(t: torch.Tensor) -> torch.Tensor:
    """t (..., L, n) with a unit stride along n (a copy only where it lacks one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _SelectiveScan(torch.autograd.Function):
    """The whole selective scan on float32 tensors (u, delta, z (b, d, L) in any layout; B, C (b, g, L, n) with a
    unit stride along n); runs the implementation in use, whose backward is hand-written.
    An implementation's forward returns (out, last_state, saved tensors), its backward(saved, softplus, dout)
    the gradients of (u, delta, A, B, C, D, z, delta_bias)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        impl = _implementation_for(u)
        out, last_state, saved = impl.forward(u, delta, A, B, C, D, z, delta_bias, softplus,
                                              for_backward=any(ctx.needs_input_grad))
        ctx.impl, ctx.softplus = impl, softplus
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast):
        return (*ctx.impl.backward(ctx.saved_tensors, ctx.softplus, dout), None)


class _TorchScan:
    """Plain-PyTorch implementation: a Python loop over L on (b, d, n) slices; keeps every state for the
    backward. The fallback where the C kernel cannot be built; several times slower."""

    name = "torch"

    @staticmethod
    def _prepare(u, delta, A, B, C, delta_bias, softplus):
        """(b, g, h, L[, n]) views (row d = group * h + i; B, C broadcast over h), raw and final step sizes."""
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        shape = (b, g, d // g, L)
        raw = delta if delta_bias is None else delta + delta_bias[:, None]
        dt = F.softplus(raw) if softplus else raw
        decay = torch.exp(dt.reshape(*shape, 1) * A.view(1, g, d // g, 1, n))
        return shape, raw, dt, decay, B.unsqueeze(2), C.unsqueeze(2)

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus, for_backward=True):
        u, delta, z = (None if t is None else t.contiguous() for t in (u, delta, z))
        shape, _, dt, decay, Bh, Ch = _TorchScan._prepare(u, delta, A, B, C, delta_bias, softplus)
        dBu = (dt * u).reshape(*shape, 1) * Bh
        states = torch.empty_like(decay)
        x = torch.zeros_like(decay[..., 0, :])
        for t in range(shape[-1]):
            x = decay[..., t, :] * x + dBu[..., t, :]
            states[..., t, :] = x
        out = (states * Ch).sum(-1).view_as(u)
        if D is not None:
            out = out + u * D[:, None]
        if z is not None:
            out = out * F.silu(z)
        return out, x.reshape(u.shape[0], u.shape[1], -1), (u, delta, A, B, C, D, z, delta_bias, states)

    @staticmethod
    def backward(saved, softplus, dout):
        u, delta, A, B, C, D, z, delta_bias, states = saved
        shape, raw, dt, decay, Bh, Ch = _TorchScan._prepare(u, delta, A, B, C, delta_bias, softplus)
        _, g, h, L = shape
        dz = None
        if z is not None:  # out = (y + D u) * silu(z)
            sz = torch.sigmoid(z)
            pre = (states * Ch).sum(-1).view_as(u) + (0 if D is None else u * D[:, None])
            dz = dout * pre * sz * (1 + z * (1 - sz))
            dout = dout * z * sz
        gy = dout.reshape(*shape, 1)
        grads = torch.empty_like(states)  # dLoss/dx_t, through every later step
        gx = torch.zeros_like(states[..., 0, :])
        for t in range(L - 1, -1, -1):
            gx = gy[..., t, :] * Ch[..., t, :] + (decay[..., t + 1, :] * gx if t + 1 < L else 0)
            grads[..., t, :] = gx
        prev = torch.cat([torch.zeros_like(states[..., :1, :]), states[..., :-1, :]], dim=-2)
        through_decay = grads * prev * decay  # dLoss/d(dt_t A) per state
        grad_b = (grads * Bh).sum(-1).view_as(u)  # dLoss/d(dt_t u_t)
        du = grad_b * dt + (0 if D is None else dout * D[:, None])
        ddelta = (through_decay * A.view(1, g, h, 1, -1)).sum(-1).view_as(u) + grad_b * u
        if softplus:
            ddelta = ddelta * torch.sigmoid(raw)
        dA = (through_decay * dt.reshape(*shape, 1)).sum(dim=(0, 3)).reshape_as(A)
        dB = (grads * (dt * u).reshape(*shape, 1)).sum(2)
        dC = (gy * states).sum(2)
        dD = None if D is None else (dout * u).sum(dim=(0, 2))
        dbias = None if delta_bias is None else ddelta.sum(dim=(0, 2))
        return du, ddelta, dA, dB, dC, dD, dz, dbias


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


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will want gradients through these tensors (grad mode on and one of them requires it):
    else the forward-only paths (no autograd Function, no checkpoints, the fused convolution) serve."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def uses_compiled_scan() -> bool:
    """True when CPU scans run on the compiled C kernel (it built here)."""
    return _implementation() is scan_kernel.CompiledScan


def _implementation_for(u: torch.Tensor):
    """The C kernel reads CPU memory; other devices (CUDA without mamba_ssm, MPS) get the PyTorch scan."""
    return _implementation() if u.device.type == "cpu" else _TorchScan
