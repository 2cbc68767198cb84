"""Reference embeddings: combining the CLIP embeddings of several images before projection, merging the
CLIP outputs of an image's tiles (the enhancer), and their files.

``concat`` keeps every image (their tokens are concatenated after projection: T·n tokens); the other
modes reduce the batch of embeddings [n, ...] to one [1, ...] and so keep T tokens.
"""
from __future__ import annotations

import math
import os

import torch

from .choices import check_choice
from .weights_file import WeightsFileError, load_weights_only

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def check_combine_mode(mode: str) -> None:
    check_choice("combine_embeds", mode, COMBINE_MODES)


def combine_embeds(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """[n, ...] -> [n, ...] for concat, else [1, ...].

    subtract: the first image minus the mean of the others; norm average: the mean of the
    embeddings each scaled to unit L2 norm, rescaled to their mean norm (so no image dominates by
    magnitude alone)."""
    check_combine_mode(mode)
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


def merge_tile_embeds(tiles: torch.Tensor) -> torch.Tensor:
    """The CLIP outputs of each image's grid x grid tiles merged into one image's: [B, g², ...] -> [B, ...].

    Pooled embeds [B, g², E]: the mean over the tiles. Hidden states [B, g², 1 + s², E] (class token,
    then an s x s patch grid): the class token is the tiles' mean; the tiles' patch grids, laid out as
    the tiles lie in the image (a (g·s)² grid), are average-pooled over g x g blocks back to s x s, so
    patch (p, q) covers the same place of the image as the whole image's patch (p, q)."""
    if tiles.ndim == 3:
        return tiles.mean(dim=1)
    b, count, n, e = tiles.shape
    g, s = math.isqrt(count), math.isqrt(n - 1)
    if g * g != count or s * s != n - 1:
        raise ValueError(f"merge_tile_embeds: expected [B, g², 1 + s², E], got shape {tuple(tiles.shape)}")
    patches = tiles[:, :, 1:].reshape(b, g, g, s, s, e).permute(0, 1, 3, 2, 4, 5).reshape(b, g * s, g * s, e)
    pooled = patches.reshape(b, s, g, s, g, e).mean(dim=(2, 4)).reshape(b, s * s, e)
    return torch.cat([tiles[:, :, :1].mean(dim=1), pooled], dim=1)


def enhance_embeds(whole: torch.Tensor, merged: torch.Tensor, ratio: float) -> torch.Tensor:
    """The enhancer's reference embeds from the whole images' [B, ...] and their merged tiles' [B, ...]:
    one image gives two references, [ratio · whole, tiles] ([2, ...], for combine_embeds to join); several
    give one each, ratio · whole + (1 - ratio) · tiles."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"enhance_ratio: expected 0 to 1, got {ratio}")
    if whole.shape[0] == 1:
        return torch.cat([whole * ratio, merged])
    return torch.lerp(merged, whole, ratio)


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
            loaded = load_weights_only(path)
    except WeightsFileError as err:
        raise ValueError(f"embeds: {err}") from None
    except Exception as err:  # a damaged safetensors file
        raise ValueError(f"embeds: {name} is not a readable embeds file "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(loaded, torch.Tensor) or loaded.ndim not in (2, 3) or not loaded.is_floating_point():
        raise ValueError(f"embeds: {name} does not hold one float tensor [n, E] or [n, N, E] under '{EMBEDS_KEY}'")
    return loaded.float()
