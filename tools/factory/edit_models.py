"""Edit-model files in layouts the host does not load by itself.

A diffusers-format SD1.5 edit UNet, as HQ-Edit ships it: ``UNet2DConditionModel`` keys, 8 input channels,
one ``diffusion_pytorch_model.safetensors``. Shapes come from diffusers' own class built on the meta device.
"""
from __future__ import annotations

import torch

from .pool import WeightPools, meta_shapes

# The tiny SD1.5 UNet (host_models.TINY_SD15_UNET) in diffusers' config terms: one level, 320 wide.
TINY_SD15_DIFFUSERS = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
                           cross_attention_dim=768, attention_head_dim=8)
TINY_SD15_EDIT_DIFFUSERS = dict(TINY_SD15_DIFFUSERS, in_channels=8)


def diffusers_unet(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict of ``config``, every weight random (diffusers itself
    initialises some output layers to zero, which would hide a wrong key)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        shapes = meta_shapes(UNet2DConditionModel(**config))
    return WeightPools(seed).state_dict(shapes)
