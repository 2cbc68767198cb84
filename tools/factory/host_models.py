"""State dicts in the layouts of real checkpoint, ControlNet and CLIP vision files.

UNet and ControlNet shapes come from the host's own model classes built on the meta device,
so the keys are exactly those of original (LDM) checkpoints. CLIP-L text and the vision encoders
come from transformers' CLIP classes, the layout of the public encoder files; SDXL's second text
encoder is written in OpenCLIP's own key names, as the SDXL base checkpoint stores it.
"""
from __future__ import annotations

import math

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
# OpenCLIP ViT-bigG/14 text tower (SDXL's second text encoder): width, depth, MLP width, vocabulary,
# context length and projection size; 20 heads of 64 (the heads leave no trace in the weights' shapes).
OPEN_CLIP_BIGG_TEXT = dict(width=1280, layers=32, heads=20, mlp_width=5120, vocab_size=49408, context_length=77,
                           embed_dim=1280)
CLIP_VISION = {
    "ViT-H-14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "ViT-bigG-14": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu"),
    "ViT-L-14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    "ViT-L-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
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
    """CLIP-L text as the public checkpoints store it: ``text_model.*`` keys and int64 position ids.
    transformers 5 leaves the ``text_model.`` prefix out of ``CLIPTextModel``'s own state dict; the host
    finds SDXL's CLIP-L only under it (SD1.5 loading adds it where it is missing)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        shapes = meta_shapes(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)))
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in pools.state_dict(shapes).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(CLIP_L_TEXT["max_position_embeddings"]).unsqueeze(0)
    return sd


def open_clip_text_shapes(width: int, layers: int, mlp_width: int, vocab_size: int, context_length: int,
                          embed_dim: int, **_) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of an OpenCLIP text tower (its ``CLIP`` model without ``visual``), OpenCLIP's key
    names: the attention's q, k and v stacked in ``in_proj_*``, ``text_projection`` a bare [width, embed_dim]
    matrix (applied as ``x @ text_projection``)."""
    shapes = {"token_embedding.weight": (vocab_size, width), "positional_embedding": (context_length, width)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp_width, width), block + "mlp.c_fc.bias": (mlp_width,),
            block + "mlp.c_proj.weight": (width, mlp_width), block + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed_dim)})
    return shapes


def open_clip_text(pools: WeightPools, config: dict) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower with its ``logit_scale`` (log 100, the trained models' clamp)."""
    sd = pools.state_dict(open_clip_text_shapes(**config))
    sd["logit_scale"] = torch.tensor(math.log(100.0), dtype=pools.dtype)
    return sd


def sdxl_text_encoders(pools: WeightPools) -> dict[str, torch.Tensor]:
    """SDXL's two text encoders under the base checkpoint's prefixes: CLIP-L (transformers layout) and
    OpenCLIP ViT-bigG/14 text (OpenCLIP layout)."""
    return {**_prefixed("conditioner.embedders.0.transformer.", clip_l_text(pools)),
            **_prefixed("conditioner.embedders.1.model.", open_clip_text(pools, OPEN_CLIP_BIGG_TEXT))}


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
    """An SDXL-family checkpoint: UNet, both text encoders in the base checkpoint's layout and a TAESD VAE."""
    pools = WeightPools(seed)
    unet = _prefixed("model.diffusion_model.", pools.state_dict(unet_shapes(unet_config)))
    vae = _prefixed("first_stage_model.", taesd(pools, SDXL_VAE_SCALE))
    return {**unet, **sdxl_text_encoders(pools), **vae}  # drawn last: UNet and VAE weights stay as they were


def controlnet(unet_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """An original-format ControlNet (``control_model.*``) for a UNet of ``unet_config``."""
    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    return _prefixed("control_model.", WeightPools(seed).state_dict(controlnet_shapes(config)))
