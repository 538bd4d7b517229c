"""The correctness oracle: a selective scan with exactly mamba_ssm's `selective_scan_ref` semantics.

Real A only (the project never uses complex A), B/C variable per step: (batch, d_state, L) or grouped
(batch, groups, d_state, L). Written step by step like the reference, so autograd through it gives the true
gradients. It is slow on purpose: it is the oracle, never a code path of the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """u, delta, z: (b, d, L); A: (d, n); B, C: (b, n, L) or (b, g, n, L); D, delta_bias: (d,)."""
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B = B.float()
    C = C.float()
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (b, d, n, L)
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    x = u.new_zeros((batch, dim, dstate))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    last_state = x
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None].float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)
