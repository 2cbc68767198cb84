"""The mask of a masked edit: sized like the edited image, with an edge feathered inward.

Masks are ComfyUI MASK tensors [B, H, W] (or [H, W]) in [0, 1]; 1 is where the image may change. The
feather lies inside the masked region, so every pixel outside the mask keeps the input image: the mask
value rises from its edge over ``radius`` pixels, linearly in the chessboard distance to the outside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .latent import apply_resolution_policy


def feather_inward(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask`` [B, H, W] with a ramp of ``radius`` pixels inside its edge: the mean of the mask eroded
    1..radius times (3x3 minimum). In a binary mask, a pixel at chessboard distance d from the outside
    gets min(d − 1, radius) / radius; the image border is not an edge. Where the mask is 0 it stays 0;
    radius 0 returns ``mask``."""
    if radius < 0:
        raise ValueError(f"feather: {radius} pixels is negative")
    eroded, total = mask.unsqueeze(1), torch.zeros_like(mask.unsqueeze(1))
    for _ in range(radius):
        eroded = -F.max_pool2d(-eroded, kernel_size=3, stride=1, padding=1)  # padding counts as inside
        total += eroded
    return mask if radius == 0 else (total / radius).squeeze(1)


def edit_mask(mask: torch.Tensor, image_size: tuple[int, int], policy: str, long_side: int,
              radius: int, images: int = 1) -> torch.Tensor:
    """The noise mask [B, h, w] for ``images`` images of ``image_size`` (H, W) sized by the resolution ``policy``:
    stretched to the image's size if it differs (bilinear), sized by the same policy, then feathered inward.
    One mask serves every image; otherwise B must be ``images`` (ValueError naming the mask)."""
    mask = mask.reshape(-1, *mask.shape[-2:]).float()
    if mask.shape[0] not in (1, images):
        raise ValueError(f"mask: {mask.shape[0]} masks for {images} images; give one mask for every image or one "
                         f"mask per image")
    if tuple(mask.shape[-2:]) != tuple(image_size):
        mask = F.interpolate(mask.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False).squeeze(1)
    sized = apply_resolution_policy(mask.unsqueeze(-1), policy, long_side)[..., 0]
    return feather_inward(sized.clamp(0, 1), radius)
