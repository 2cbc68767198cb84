"""The image latent an edit UNet reads in its extra input channels, and the input resolution policies.

An edit UNet takes 8 input channels: the noisy latent, then the latent of the input image. Which image
latent depends on how the model was trained: SD1.5 and SDXL InstructPix2Pix read the VAE posterior mean
*without* the VAE scaling factor; CosXL Edit reads it scaled. "No image" is zeros in every case (the
training dropout multiplied the image latent by 0), never the latent of a blank image.

Images are ComfyUI IMAGE tensors [B, H, W, C] in [0, 1]; latents are [B, 4, H/8, W/8].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Model kind -> does the UNet read the image latent multiplied by the VAE scaling factor?
SCALED_IMAGE_LATENT = {"sd15_ip2p": False, "sdxl_ip2p": False, "cosxl_edit": True}
RESOLUTION_POLICIES = ("crop to multiple of 8", "long side to target, multiples of 64")


def conditioning_latent(vae_mean: torch.Tensor, kind: str, scaling_factor: float) -> torch.Tensor:
    """The image latent the UNet of ``kind`` reads, from the raw VAE posterior mean [B, 4, h, w]."""
    if kind not in SCALED_IMAGE_LATENT:
        raise ValueError(f"unknown edit model kind {kind!r}; known: {', '.join(SCALED_IMAGE_LATENT)}")
    return vae_mean * scaling_factor if SCALED_IMAGE_LATENT[kind] else vae_mean


def null_image_latent(image_latent: torch.Tensor) -> torch.Tensor:
    """The unconditional image: zeros of the image latent's shape (zeros stay zeros when scaled)."""
    return torch.zeros_like(image_latent)


def crop_to_multiple(image: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Center-crop H and W down to multiples of ``multiple`` (the host's policy; no resampling)."""
    height, width = (image.shape[1] // multiple) * multiple, (image.shape[2] // multiple) * multiple
    if min(height, width) == 0:
        raise ValueError(f"image: {image.shape[1]}x{image.shape[2]} is smaller than {multiple} pixels")
    top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
    return image[:, top:top + height, left:left + width]


def paper_size(height: int, width: int, long_side: int = 512, multiple: int = 64) -> tuple[int, int]:
    """The original code's output size: scale so the long side is about ``long_side``, round the scaled
    short side up to a multiple of ``multiple``, then floor both sides to multiples of ``multiple``."""
    short = min(height, width)
    short_target = -(-short * long_side // (max(height, width) * multiple)) * multiple  # integer ceil: exact
    return tuple(max(multiple, side * short_target // (short * multiple) * multiple) for side in (height, width))


def fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (bicubic, antialiased) to cover ``height`` x ``width`` keeping the aspect ratio, then center-crop."""
    scale = max(height / image.shape[1], width / image.shape[2])
    cover = (max(height, round(image.shape[1] * scale)), max(width, round(image.shape[2] * scale)))
    resized = F.interpolate(image.movedim(-1, 1), size=cover, mode="bicubic", antialias=True, align_corners=False)
    top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
    return resized[:, :, top:top + height, left:left + width].movedim(1, -1).clamp(0, 1)


def apply_resolution_policy(image: torch.Tensor, policy: str, long_side: int = 512) -> torch.Tensor:
    """``image`` sized by one of RESOLUTION_POLICIES: the host's crop, or the paper's long side + multiples of 64."""
    if policy == RESOLUTION_POLICIES[0]:
        return crop_to_multiple(image)
    if policy == RESOLUTION_POLICIES[1]:
        return fit(image, *paper_size(image.shape[1], image.shape[2], long_side))
    raise ValueError(f"resolution: {policy!r} is not one of {RESOLUTION_POLICIES}")
