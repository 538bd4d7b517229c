"""Quaternion and rotation helpers on torch tensors (w, x, y, z order, Hamilton product).

All functions broadcast over leading dimensions. They follow the conventions of HumanML3D's
``common/quaternion.py`` so that features computed here match HumanML3D's files.
"""

from __future__ import annotations

import torch


def qmul(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Hamilton product q * r."""
    w1, x1, y1, z1 = q.unbind(-1)
    w2, x2, y2, z2 = r.unbind(-1)
    return torch.stack(
        (
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ),
        dim=-1,
    )


def qinv(q: torch.Tensor) -> torch.Tensor:
    """Inverse of a unit quaternion (its conjugate)."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def qrot(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors v (..., 3) by unit quaternions q (..., 4)."""
    qvec = q[..., 1:]
    uv = torch.cross(qvec, v, dim=-1)
    uuv = torch.cross(qvec, uv, dim=-1)
    return v + 2 * (q[..., :1] * uv + uuv)


def qnormalize(q: torch.Tensor) -> torch.Tensor:
    """Scale quaternions to unit length."""
    return q / torch.linalg.norm(q, dim=-1, keepdim=True)


def qbetween(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The smallest rotation taking direction v0 to direction v1 (HumanML3D's ``qbetween``)."""
    v = torch.cross(v0, v1, dim=-1)
    w = torch.sqrt((v0**2).sum(-1, keepdim=True) * (v1**2).sum(-1, keepdim=True)) + (v0 * v1).sum(-1, keepdim=True)
    return qnormalize(torch.cat([w, v], dim=-1))


def qfix(q: torch.Tensor) -> torch.Tensor:
    """Flip signs along time (dim -3 of (..., T, J, 4) or dim -2 of (..., T, 4)) so neighbours agree."""
    time_dim = q.dim() - 3 if q.dim() >= 3 else 0
    if q.shape[time_dim] < 2:
        return q
    dots = (q.narrow(time_dim, 1, q.shape[time_dim] - 1) * q.narrow(time_dim, 0, q.shape[time_dim] - 1)).sum(-1)
    flips = torch.cumsum((dots < 0).to(torch.int64), dim=time_dim) % 2
    sign = torch.cat([torch.zeros_like(flips.narrow(time_dim, 0, 1)), flips], dim=time_dim)
    return q * (1 - 2 * sign).unsqueeze(-1).to(q.dtype)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4) to rotation matrices (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    two = 2.0
    return torch.stack(
        (
            1 - two * (y * y + z * z),
            two * (x * y - z * w),
            two * (x * z + y * w),
            two * (x * y + z * w),
            1 - two * (x * x + z * z),
            two * (y * z - x * w),
            two * (x * z - y * w),
            two * (y * z + x * w),
            1 - two * (x * x + y * y),
        ),
        dim=-1,
    ).reshape((*q.shape[:-1], 3, 3))


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) to unit quaternions (..., 4) with w >= 0 (numerically stable branch)."""
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    candidates = torch.stack(
        (
            torch.stack((1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01), -1),
            torch.stack((m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20), -1),
            torch.stack((m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21), -1),
            torch.stack((m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22), -1),
        ),
        dim=-2,
    )
    best = torch.stack((m00 + m11 + m22, m00, m11, m22), -1).argmax(-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand((*best.shape, 1, 4))).squeeze(-2)
    q = qnormalize(q)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)


def quat_to_cont6d(q: torch.Tensor) -> torch.Tensor:
    """The continuous 6D rotation representation: the first two columns of the rotation matrix."""
    m = quat_to_matrix(q)
    return torch.cat([m[..., 0], m[..., 1]], dim=-1)


def cont6d_to_matrix(c: torch.Tensor) -> torch.Tensor:
    """The continuous 6D representation (two matrix columns, :func:`quat_to_cont6d`) back to rotation matrices
    (..., 3, 3) by Gram-Schmidt, as HumanML3D's ``cont6d_to_matrix``; any 6 numbers give a rotation."""
    x = c[..., 0:3] / torch.linalg.norm(c[..., 0:3], dim=-1, keepdim=True)
    z = torch.cross(x, c[..., 3:6], dim=-1)
    z = z / torch.linalg.norm(z, dim=-1, keepdim=True)
    y = torch.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-1)
