"""Random-weight Flux files at the real widths with reduced depth: the transformer and XLabs' IP-Adapters.

The transformer's keys and shapes come from the host's own Flux class built on the meta device with
FLUX.1-dev's settings (the layout of Black Forest Labs' files, which the host detects as Flux); only the
number of double- and single-stream blocks is smaller. XLabs' adapter files keep their published flat keys:
``ip_adapter_proj_model.{proj,norm}.*`` (image_embeds 768 -> T tokens of 4096) and per double-stream block
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`` [3072, 4096].
"""
from __future__ import annotations

import dataclasses

import torch

from .pool import WeightPools, meta_shapes

# FLUX.1-dev's transformer settings (as the host reads them from a file), at depth 2 + 1 instead of 19 + 38.
FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_REDUCED = dict(FLUX_DEV, depth=2, depth_single_blocks=1)
XLABS_TOKENS = {"flux-ip-adapter": 4, "flux-ip-adapter-v2": 16}
XLABS_IMAGE_EMBED = 768  # CLIP ViT-L/14 image_embeds


# Settings that newer hosts' FluxParams require and that their detection gives FLUX.1-dev (0.28: which text
# position axes count up; none for FLUX.1); passed only to a host whose FluxParams has them.
FLUX_DEV_HOST_DEFAULTS = dict(txt_ids_dims=[])


def host_flux_config(config: dict) -> dict:
    """``config`` with the FLUX.1-dev values of the settings this host's FluxParams requires beyond it."""
    from comfy.ldm.flux.model import FluxParams
    fields = {field.name for field in dataclasses.fields(FluxParams)}
    return {**config, **{k: v for k, v in FLUX_DEV_HOST_DEFAULTS.items() if k in fields and k not in config}}


def published_names(shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The key names of Black Forest Labs' files for a host Flux module's: the per-head RMS norms' weights are
    ``*_norm.scale`` there (0.28 hosts name the module's ``*_norm.weight`` and rename the file's on loading), so a
    factory file has one layout whichever host built it."""
    suffixes = ("query_norm.weight", "key_norm.weight")
    return {(k[:-len("weight")] + "scale" if k.endswith(suffixes) else k): s for k, s in shapes.items()}


def flux_shapes(config: dict) -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    with torch.device("meta"):
        return published_names(meta_shapes(Flux(operations=comfy.ops.disable_weight_init, **host_flux_config(config))))


def flux_transformer(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A Flux transformer file (diffusion_models/, the original key names) of ``config``."""
    return WeightPools(seed).state_dict(flux_shapes(config))


def xlabs_adapter(stem: str, seed: int, blocks: int, hidden: int = 3072, context: int = 4096) -> dict[str, torch.Tensor]:
    """An XLabs Flux IP-Adapter (``stem`` a key of XLABS_TOKENS) for ``blocks`` double-stream blocks."""
    tokens = XLABS_TOKENS[stem]
    shapes = {"ip_adapter_proj_model.proj.weight": (tokens * context, XLABS_IMAGE_EMBED),
              "ip_adapter_proj_model.proj.bias": (tokens * context,),
              "ip_adapter_proj_model.norm.weight": (context,), "ip_adapter_proj_model.norm.bias": (context,)}
    for i in range(blocks):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj."
            shapes.update({prefix + "weight": (hidden, context), prefix + "bias": (hidden,)})
    return WeightPools(seed).state_dict({k: torch.Size(s) for k, s in shapes.items()})


# InstantX's FLUX.1-dev IP-Adapter (ip-adapter.bin): SigLIP's pooled output 1152 -> MLP -> 128 tokens of 4096, and
# bias-free image K/V [3072, 4096] for every double- and single-stream block, numbered in that order.
INSTANTX_FLUX_TOKENS = 128
SIGLIP_POOLED = 1152


def instantx_flux_adapter(seed: int, blocks: int, mlp_width: int = 2 * SIGLIP_POOLED, hidden: int = 3072,
                          context: int = 4096) -> dict[str, dict]:
    """{"image_proj": ..., "ip_adapter": ...} as published, for ``blocks`` blocks; ``mlp_width`` (2304 published)
    is the MLP's inner width, which the file's shapes give (the published 1.2 B-parameter output layer is mostly
    it times 128 tokens of 4096)."""
    out = INSTANTX_FLUX_TOKENS * context
    proj = {"proj.0.weight": (mlp_width, SIGLIP_POOLED), "proj.0.bias": (mlp_width,), "proj.2.weight": (out, mlp_width),
            "proj.2.bias": (out,), "norm.weight": (context,), "norm.bias": (context,)}
    ip = {f"{i}.to_{kind}_ip.weight": (hidden, context) for i in range(blocks) for kind in ("k", "v")}
    pools = WeightPools(seed)
    return {group: pools.state_dict({k: torch.Size(s) for k, s in shapes.items()})
            for group, shapes in (("image_proj", proj), ("ip_adapter", ip))}


# XLabs' Flux ControlNets (flux-canny-controlnet-v3 and kin): the Flux input layers, 2 double-stream blocks, a
# zero-initialised linear per block, and the hint convolutions; in the host's ControlNetFlux layout.
XLABS_CONTROLNET = dict(FLUX_DEV, depth=2, depth_single_blocks=0)
# Black Forest Labs' autoencoder (ae.safetensors): 16 latent channels, no quant convolutions.
FLUX_VAE = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def xlabs_controlnet(seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux
    with torch.device("meta"):
        shapes = published_names(meta_shapes(ControlNetFlux(operations=comfy.ops.disable_weight_init,
                                                             **host_flux_config(XLABS_CONTROLNET))))
    return WeightPools(seed).state_dict(shapes)


def flux_vae(seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    with torch.device("meta"):
        shapes = {**{f"encoder.{k}": s for k, s in meta_shapes(Encoder(**FLUX_VAE)).items()},
                  **{f"decoder.{k}": s for k, s in meta_shapes(Decoder(**FLUX_VAE)).items()}}
    return WeightPools(seed).state_dict(shapes)


# SigLIP so400m/14 at 384 px (sigclip_vision_patch14_384.safetensors): the encoder of InstantX's adapters.
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh")


def siglip_vision(seed: int) -> dict[str, torch.Tensor]:
    """A SigLIP vision file as published (``vision_model.*`` keys; transformers 5 leaves the prefix out of the
    model's own state dict)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M))
    return {"vision_model." + k.removeprefix("vision_model."): v
            for k, v in WeightPools(seed).state_dict(meta_shapes(model)).items()}


# InstantX's SD3.5-Large IP-Adapter: a time-conditioned resampler (SigLIP so400m hidden states 1152 -> 64 tokens of
# the transformer's width, perceiver width 1280, 20 heads, 4 layers, timestep features 320) and, per joint block,
# an AdaLN of the tokens on the resampler's time embedding, K/V projections and three per-head RMS norms.
SD35_RESAMPLER = dict(tokens=64, embed_dim=1152, width=1280, heads=20, depth=4, frequencies=320)


def instantx_sd35_adapter(seed: int, blocks: int, hidden: int = 2432, head_dim: int = 64) -> dict[str, dict]:
    """{"image_proj": ..., "ip_adapter": ...} as InstantX publishes them (ip-adapter.bin), for ``blocks`` joint
    blocks of width ``hidden``."""
    r = SD35_RESAMPLER
    w, inner = r["width"], r["heads"] * 64
    proj = {"latents": (1, r["tokens"], w), "proj_in.weight": (w, r["embed_dim"]), "proj_in.bias": (w,),
            "proj_out.weight": (hidden, w), "proj_out.bias": (hidden,), "norm_out.weight": (hidden,),
            "norm_out.bias": (hidden,), "time_embedding.linear_1.weight": (w, r["frequencies"]),
            "time_embedding.linear_1.bias": (w,), "time_embedding.linear_2.weight": (w, w),
            "time_embedding.linear_2.bias": (w,)}
    for i in range(r["depth"]):
        a, f, t = f"layers.{i}.0.", f"layers.{i}.1.", f"layers.{i}.2."
        proj.update({a + "norm1.weight": (w,), a + "norm1.bias": (w,), a + "norm2.weight": (w,), a + "norm2.bias": (w,),
                     a + "to_q.weight": (inner, w), a + "to_kv.weight": (2 * inner, w), a + "to_out.weight": (w, inner),
                     f + "0.weight": (w,), f + "0.bias": (w,), f + "1.weight": (4 * w, w), f + "3.weight": (w, 4 * w),
                     t + "1.weight": (4 * w, w), t + "1.bias": (4 * w,)})
    ip = {}
    for i in range(blocks):
        ip.update({f"{i}.norm_ip.linear.weight": (2 * hidden, w), f"{i}.norm_ip.linear.bias": (2 * hidden,),
                   f"{i}.to_k_ip.weight": (hidden, hidden), f"{i}.to_v_ip.weight": (hidden, hidden),
                   f"{i}.norm_q.weight": (head_dim,), f"{i}.norm_k.weight": (head_dim,),
                   f"{i}.norm_ip_k.weight": (head_dim,)})
    pools = WeightPools(seed)
    return {group: pools.state_dict({k: torch.Size(s) for k, s in shapes.items()})
            for group, shapes in (("image_proj", proj), ("ip_adapter", ip))}


def sd35_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """An SD3.5-style checkpoint without text encoders: a 2-block MMDiT and a 16-channel autoencoder (the layout of
    FLUX.1's and SD3's)."""
    return {**{f"model.diffusion_model.{k}": v for k, v in sd3_transformer(2, seed).items()},
            **{f"first_stage_model.{k}": v for k, v in flux_vae(seed + 1).items()}}


def sd3_transformer(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """An SD3-family MMDiT file (diffusion_models/, Stability's key names) of ``depth`` joint blocks; the host ties
    the width to the depth (64 per block), so SD3.5-Large's 2432 comes only with its 38 blocks."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    context = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * depth}}
    with torch.device("meta"):
        model = MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=depth, pos_embed_max_size=32,
                      num_patches=32 * 32, adm_in_channels=2048, context_embedder_config=context, qk_norm="rms",
                      operations=comfy.ops.disable_weight_init)
    return WeightPools(seed).state_dict(meta_shapes(model))
