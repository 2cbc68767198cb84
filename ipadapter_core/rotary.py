"""Undoing rotary position embedding (RoPE) on attention queries.

A RoPE'd query rotates each channel pair (x0, x1) of each head by a 2x2 matrix R that depends on the token's
position: q_rope[..., p] = R_p q[..., p]. The host hands attention only q_rope; image attention that its adapter
trained on the query before RoPE reads R_p^T q_rope[..., p] (R is orthogonal), which is exact up to rounding.
"""
from __future__ import annotations

import torch


def unrotate(q: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """q [B, H, L, D] after RoPE, ``rotations`` [B or 1, 1, L, D/2, 2, 2] the matrices it was rotated by (Flux's
    ``pe``): q before RoPE, [B, H, L, D], in q's dtype (computed in float32)."""
    pairs = q.float().unflatten(-1, (-1, 2))  # [B, H, L, D/2, 2]
    r = rotations.float()
    x0, x1 = pairs.unbind(-1)
    return torch.stack((r[..., 0, 0] * x0 + r[..., 1, 0] * x1, r[..., 0, 1] * x0 + r[..., 1, 1] * x1),
                       dim=-1).flatten(-2).to(q.dtype)
