"""Combining the CLIP embeddings of several reference images before projection.

``concat`` keeps every image (their tokens are concatenated after projection: T·n tokens); the other
modes reduce the batch of embeddings [n, ...] to one [1, ...] and so keep T tokens.
"""
from __future__ import annotations

import torch

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def combine_embeds(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """[n, ...] -> [n, ...] for concat, else [1, ...].

    subtract: the first image minus the mean of the others; norm average: the mean of the
    embeddings each scaled to unit L2 norm, rescaled to their mean norm (so no image dominates by
    magnitude alone)."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine_embeds: '{mode}' is not one of {', '.join(COMBINE_MODES)}")
    if mode == "concat" or embeds.shape[0] == 1:
        return embeds
    if mode == "add":
        return embeds.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].mean(dim=0, keepdim=True)
    if mode == "average":
        return embeds.mean(dim=0, keepdim=True)
    if mode == "norm average":
        norms = embeds.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (embeds.dim() - 1)))
        return (embeds / norms).mean(dim=0, keepdim=True) * norms.mean()
    if mode == "max":
        return embeds.max(dim=0, keepdim=True).values
    return embeds.min(dim=0, keepdim=True).values
