"""Reference-image preparation for CLIP vision, in pure torch. Images are the host's IMAGE layout:
float [B, H, W, C] in 0..1.

CLIP vision sees a square; these helpers decide which square: a crop at a chosen position, the whole
image padded with CLIP's mean colour (which normalises to zero, so the padding adds nothing), a row
of overlapping square tiles that together cover a long image, or a grid of equal tiles (the enhancer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .choices import check_choice

CROP_POSITIONS = ("center", "top", "bottom", "left", "right", "pad")
INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")
NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
# CLIP's normalisation mean: an image of this colour encodes to zeros after preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _check(name: str, image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[1:3]) < 2:
        raise ValueError(f"{name}: expected an IMAGE batch [B, H, W, 3] of at least 2x2 pixels, "
                         f"got shape {tuple(image.shape)}")


def as_rgb(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """[B, H, W, 1|3|4] -> float32 [B, H, W, 3]: grey is repeated, alpha dropped (a host that keeps
    images in half precision still gets float resampling, which half lacks on the CPU)."""
    _check(name, image)
    image = image.float()
    return image[..., :3] if image.shape[-1] != 1 else image.expand(*image.shape[:3], 3)


def square(image: torch.Tensor, position: str) -> torch.Tensor:
    """[B, H, W, 3] -> [B, S, S, 3]: the square of side min(H, W) at ``position``, or with ``pad`` the
    whole image centred on a square of side max(H, W) filled with CLIP's mean colour."""
    check_choice("crop_position", position, CROP_POSITIONS)
    b, h, w, c = image.shape
    if position == "pad":
        side = max(h, w)
        canvas = torch.tensor(CLIP_MEAN, dtype=image.dtype, device=image.device).repeat(b, side, side, 1)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top:top + h, left:left + w] = image
        return canvas
    side = min(h, w)
    top = {"top": 0, "bottom": h - side}.get(position, (h - side) // 2)
    left = {"left": 0, "right": w - side}.get(position, (w - side) // 2)
    return image[:, top:top + side, left:left + side]


def resize(image: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """[B, H, W, C] -> [B, size, size, C] (antialiased when shrinking, for the smooth modes)."""
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    x = image.movedim(-1, 1)
    smooth = interpolation in ("bicubic", "bilinear")
    x = F.interpolate(x, size=(size, size), mode=interpolation, antialias=smooth,
                      **({"align_corners": False} if smooth else {}))
    return x.movedim(1, -1).clamp(0, 1)


def blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur of [B, H, W, C] with a kernel of 2 * radius + 1 pixels (sigma = radius / 2)."""
    if radius <= 0:
        return image
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / max(radius / 2, 0.5)) ** 2)
    kernel = kernel / kernel.sum()
    x = image.movedim(-1, 1)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x.movedim(1, -1)


def sharpen(image: torch.Tensor, amount: float) -> torch.Tensor:
    """Unsharp mask: image + amount * (image - blur(image)), in 0..1."""
    if amount == 0:
        return image
    return (image + amount * (image - blur(image, 1))).clamp(0, 1)


def prepare(image: torch.Tensor, size: int, crop_position: str = "center", interpolation: str = "bicubic",
            sharpening: float = 0.0) -> torch.Tensor:
    """[B, H, W, 1|3|4] -> [B, size, size, 3]: the square CLIP vision will see, sharpened after resizing."""
    return sharpen(resize(square(as_rgb(image), crop_position), size, interpolation), sharpening)


def tile_spans(length: int, side: int) -> list[tuple[int, int]]:
    """Overlapping spans [start, end) of ``side`` pixels that cover ``length``, evenly spaced: one span
    when length <= side * 1.25 (a near-square image is one tile)."""
    count = max(1, math.ceil(length / side - 0.25))
    if count == 1:
        start = (length - side) // 2
        return [(start, start + side)]
    step = (length - side) / (count - 1)
    return [(round(i * step), round(i * step) + side) for i in range(count)]


def tiles(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A long image as square tiles along its long side, and where each tile lies in the frame.

    [B, H, W, 3] -> tiles [K, B, S, S, 3] with S = min(H, W), and masks [K, H, W] (1 inside tile k).
    A generated image of any size gets tile k's tokens on the same share of its width (or height)."""
    b, h, w, c = image.shape
    along_width = w >= h
    spans = tile_spans(w if along_width else h, min(h, w))
    crops, masks = [], torch.zeros(len(spans), h, w, dtype=image.dtype, device=image.device)
    for k, (start, end) in enumerate(spans):
        if along_width:
            crops.append(image[:, :, start:end])
            masks[k, :, start:end] = 1
        else:
            crops.append(image[:, start:end])
            masks[k, start:end] = 1
    return torch.stack(crops), masks


MAX_GRID = 16  # tiles per side of the CLIP-vision enhancer


def grid_tiles(image: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, H, W, 3] -> [B, grid², H // grid, W // grid, 3]: each image cut into a grid x grid of equal
    tiles, row by row (a remainder of fewer than ``grid`` pixels at the bottom and right is left out)."""
    if not 1 <= grid <= MAX_GRID:
        raise ValueError(f"enhance_tiles: expected 1 to {MAX_GRID} tiles per side, got {grid}")
    b, h, w, c = image.shape
    th, tw = h // grid, w // grid
    if min(th, tw) < 2:
        raise ValueError(f"enhance_tiles: {grid} tiles per side of a {h}x{w} image are under 2 pixels; "
                         f"use fewer tiles or a larger image")
    cells = image[:, :th * grid, :tw * grid].reshape(b, grid, th, grid, tw, c)
    return cells.permute(0, 1, 3, 2, 4, 5).reshape(b, grid * grid, th, tw, c)


def noise_image(kind: str, strength: float, blur_radius: int, image: torch.Tensor | None,
                size: int = 224, seed: int = 0) -> torch.Tensor:
    """A noisy image to use as the negative reference: [B, H, W, 3] (B, H, W from ``image``, else 1 x size x size).

    fade: mix of image (grey without one) and uniform noise by ``strength``; dissolve: that share of
    pixels replaced by noise; gaussian: normal noise of std ``strength`` added; shuffle: that share of
    pixels moved to random places. Seeded, so the same inputs give the same image."""
    check_choice("type", kind, NOISE_TYPES)
    base = as_rgb(image, "image_optional") if image is not None else torch.full((1, size, size, 3), 0.5)
    generator = torch.Generator().manual_seed(seed)
    base = base.float().cpu()
    noise = torch.rand(base.shape, generator=generator)
    pick = torch.rand(base.shape[:3] + (1,), generator=generator) < strength
    if kind == "fade":
        out = torch.lerp(base, noise, strength)
    elif kind == "dissolve":
        out = torch.where(pick, noise, base)
    elif kind == "gaussian":
        out = base + strength * torch.randn(base.shape, generator=generator)
    else:
        b, h, w, c = base.shape
        flat = base.reshape(b, h * w, c)
        moved = flat[:, torch.randperm(h * w, generator=generator)]
        out = torch.where(pick.reshape(b, h * w, 1), moved, flat).reshape(b, h, w, c)
    return blur(out.clamp(0, 1), blur_radius)
