"""State dicts in the layouts of real checkpoint, ControlNet and CLIP vision files.

UNet and ControlNet shapes come from the host's own model classes built on the meta device,
so the keys are exactly those of original (LDM) checkpoints. Text and vision encoders come
from transformers' CLIP classes, the layout of the public encoder files.
"""
from __future__ import annotations

import torch

from .pool import WeightPools, meta_shapes

_SPATIAL = dict(image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
                use_temporal_attention=False, use_temporal_resblock=False)

# The real SD1.5 UNet: 4 levels, 16 cross-attention layers (input 1,2,4,5,7,8; middle; output 3..11).
SD15_UNET = dict(_SPATIAL, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # consumed from the end: output 0-2 none
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, adm_in_channels=None)

# The smallest UNet the host detects as SD1.5: one level, cross-attention in input 1, middle, output 0 and 1.
TINY_SD15_UNET = dict(SD15_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                      transformer_depth_output=[1, 1])

# The real SDXL UNet: 70 cross-attention layers with context 2048 (2.57 B parameters).
SDXL_UNET = dict(_SPATIAL, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 num_classes="sequential", adm_in_channels=2816)

# CLIP encoders of the public files (transformers config fields).
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_VISION = {
    "ViT-H-14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "ViT-bigG-14": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu"),
    "ViT-L-14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
}

SD15_VAE_SCALE = 0.18215
SDXL_VAE_SCALE = 0.13025


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        return meta_shapes(UNetModel(**config))


def controlnet_shapes(config: dict) -> dict[str, torch.Size]:
    from comfy.cldm.cldm import ControlNet
    with torch.device("meta"):
        return meta_shapes(ControlNet(hint_channels=3, **config))


def taesd(pools: WeightPools, scale: float) -> dict[str, torch.Tensor]:
    """TAESD encoder and decoder as a checkpoint's VAE (the host detects ``taesd_decoder.1.weight``)."""
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"):
        shapes = meta_shapes(TAESD())
    shapes.pop("vae_scale"), shapes.pop("vae_shift")
    sd = pools.state_dict(shapes)
    sd["vae_scale"] = torch.tensor(scale)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def clip_l_text(pools: WeightPools) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        shapes = meta_shapes(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)))
    return pools.state_dict(shapes)


def clip_vision(encoder: str, seed: int) -> dict[str, torch.Tensor]:
    """A CLIP vision file (transformers ``CLIPVisionModelWithProjection`` keys) of ``encoder``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION[encoder]))
    return WeightPools(seed).state_dict(meta_shapes(model))


def sd15_checkpoint(unet_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """An SD1.5-family checkpoint: UNet, CLIP-L text encoder and a TAESD VAE."""
    pools = WeightPools(seed)
    return {**_prefixed("model.diffusion_model.", pools.state_dict(unet_shapes(unet_config))),
            **_prefixed("cond_stage_model.transformer.", clip_l_text(pools)),
            **_prefixed("first_stage_model.", taesd(pools, SD15_VAE_SCALE))}


def sdxl_checkpoint(unet_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """An SDXL-family checkpoint with a TAESD VAE and no text encoders (tests feed conditioning directly)."""
    pools = WeightPools(seed)
    return {**_prefixed("model.diffusion_model.", pools.state_dict(unet_shapes(unet_config))),
            **_prefixed("first_stage_model.", taesd(pools, SDXL_VAE_SCALE))}


def controlnet(unet_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """An original-format ControlNet (``control_model.*``) for a UNet of ``unet_config``."""
    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    return _prefixed("control_model.", WeightPools(seed).state_dict(controlnet_shapes(config)))
