"""Reference embeddings: combining the CLIP embeddings of several images before projection, and their files.

``concat`` keeps every image (their tokens are concatenated after projection: T·n tokens); the other
modes reduce the batch of embeddings [n, ...] to one [1, ...] and so keep T tokens.
"""
from __future__ import annotations

import os

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


EMBEDS_KEY = "embeds"
EMBEDS_SUFFIXES = (".safetensors", ".ipadpt")  # ours, and the .ipadpt files of the most-used pack (read only)


def save_embeds(path: str, embeds: torch.Tensor) -> None:
    """Write EMBEDS as a safetensors file with one tensor, ``embeds``."""
    from safetensors.torch import save_file
    save_file({EMBEDS_KEY: embeds.detach().float().cpu().contiguous()}, path)


def load_embeds(path: str) -> torch.Tensor:
    """Read EMBEDS from a file save_embeds wrote, or from a .ipadpt file loaded weights-only (no pickled
    code can run); ValueError naming the file and what it holds otherwise."""
    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            loaded = load_file(path).get(EMBEDS_KEY)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file, or a pickle that asks for code, which weights-only refuses
        raise ValueError(f"embeds: {name} is not a readable embeds file "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(loaded, torch.Tensor) or loaded.ndim not in (2, 3) or not loaded.is_floating_point():
        raise ValueError(f"embeds: {name} does not hold one float tensor [n, E] or [n, N, E] under '{EMBEDS_KEY}'")
    return loaded.float()
