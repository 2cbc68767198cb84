"""Random-weight IP-Adapter files in the exact key/shape layouts of the public checkpoints.

A file is ``{"image_proj": {...}, "ip_adapter": {...}}`` (``.bin``) or the same flattened with
``image_proj.`` / ``ip_adapter.`` prefixes (``.safetensors``). ``ip_adapter`` holds
``"{id}.to_k_ip.weight"`` / ``"{id}.to_v_ip.weight"`` [C, D] at the odd processor ids of the UNet
(down blocks, up blocks, then the mid block last); FaceID files add rank-128 LoRA tensors on every
processor id. Kolors FaceID-Plus names that group ``adapter_modules`` (Kolors' own loader reads
``params["adapter_modules"]``). Shapes follow shared/reference/ip_adapter.md §2.1-2.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pool import WeightPools

LORA_RANK = 128
FACE_DIM = 512  # InsightFace embedding width
CROSS_DIM = {"sd15": 768, "sdxl": 2048, "kolors": 2048}
# attn2 widths C in processor order: down blocks, up blocks, mid block last
_SD15 = (320,) * 2 + (640,) * 2 + (1280,) * 2 + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)
_SDXL = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
CROSS_WIDTHS = {"sd15": _SD15, "sdxl": _SDXL, "kolors": _SDXL}


@dataclass(frozen=True)
class AdapterVariant:
    """One public IP-Adapter file. ``proj`` is the image_proj type:

    linear      ImageProjModel: E (pooled CLIP image_embeds) -> T tokens of D
    resampler   Perceiver Resampler: latents [1,T,dim], E (CLIP hidden or face) -> T tokens of D
    mlp         full-face MLPProjModel, per token E -> D
    faceid      MLPProjModelFaceId: face 512 -> T tokens of D
    faceid_plus ProjModelFaceIdPlus: face 512 -> T tokens of ``token_dim``, then a latent-free
                perceiver over CLIP hidden states (``embed_dim``), width token_dim, heads token_dim/64
    """
    stem: str
    base: str                 # UNet family: "sd15" | "sdxl" | "kolors" (Kolors has the SDXL attention layout)
    proj: str
    embed_dim: int            # E: input width of image_proj (CLIP image_embeds / hidden, or 512 face)
    tokens: int               # T image tokens
    dim: int = 0              # resampler width (resampler only)
    heads: int = 0            # resampler heads, 64 channels each (resampler only)
    token_dim: int = 0        # width of the image tokens when it differs from D (Kolors FaceID: 4096)
    lora: bool = False        # rank-128 LoRA on every processor (FaceID, FaceID-Plus)
    attn_group: str = "ip_adapter"  # name of the attention-weights group in the file

    @property
    def cross_dim(self) -> int:
        """D: the UNet's cross-attention width, in-dim of to_k_ip/to_v_ip."""
        return CROSS_DIM[self.base]

    @property
    def out_dim(self) -> int:
        """Width of the tokens image_proj produces."""
        return self.token_dim or self.cross_dim


_V = AdapterVariant
_PLUS15 = dict(dim=768, heads=12)
_PLUSXL = dict(dim=1280, heads=20)
VARIANTS: tuple[AdapterVariant, ...] = (
    _V("ip-adapter_sd15", "sd15", "linear", 1024, 4),
    _V("ip-adapter_sd15_light", "sd15", "linear", 1024, 4),
    _V("ip-adapter_sd15_light_v11", "sd15", "linear", 1024, 4),
    _V("ip-adapter_sd15_vit-G", "sd15", "linear", 1280, 4),
    _V("ip-adapter-plus_sd15", "sd15", "resampler", 1280, 16, **_PLUS15),
    _V("ip-adapter-plus-face_sd15", "sd15", "resampler", 1280, 16, **_PLUS15),
    _V("ip-adapter-full-face_sd15", "sd15", "mlp", 1280, 257),
    _V("ip_plus_composition_sd15", "sd15", "resampler", 1280, 16, **_PLUS15),
    _V("ip-adapter_sdxl", "sdxl", "linear", 1280, 4),
    _V("ip-adapter_sdxl_vit-h", "sdxl", "linear", 1024, 4),
    _V("ip-adapter-plus_sdxl_vit-h", "sdxl", "resampler", 1280, 16, **_PLUSXL),
    _V("ip-adapter-plus-face_sdxl_vit-h", "sdxl", "resampler", 1280, 16, **_PLUSXL),
    _V("ip_plus_composition_sdxl", "sdxl", "resampler", 1280, 16, **_PLUSXL),
    _V("ip-adapter-faceid_sd15", "sd15", "faceid", FACE_DIM, 4, lora=True),
    _V("ip-adapter-faceid-plus_sd15", "sd15", "faceid_plus", 1280, 4, lora=True),
    _V("ip-adapter-faceid-plusv2_sd15", "sd15", "faceid_plus", 1280, 4, lora=True),
    _V("ip-adapter-faceid-portrait_sd15", "sd15", "faceid", FACE_DIM, 16),
    _V("ip-adapter-faceid-portrait-v11_sd15", "sd15", "faceid", FACE_DIM, 16),
    _V("ip-adapter-faceid_sdxl", "sdxl", "faceid", FACE_DIM, 4, lora=True),
    _V("ip-adapter-faceid-plusv2_sdxl", "sdxl", "faceid_plus", 1280, 4, lora=True),
    _V("ip-adapter-faceid-portrait_sdxl", "sdxl", "faceid", FACE_DIM, 16),
    _V("ip-adapter-faceid-portrait_sdxl_unnorm", "sdxl", "resampler", FACE_DIM, 16, **_PLUSXL),
    _V("ip_adapter_plus_general", "kolors", "resampler", 1024, 16, dim=2048, heads=12),
    _V("ipa-faceid-plus", "kolors", "faceid_plus", 1024, 6, token_dim=4096, attn_group="adapter_modules"),
)
BY_STEM = {v.stem: v for v in VARIANTS}


def _perceiver(dim: int, heads: int, embed_dim: int, out_dim: int) -> dict[str, tuple]:
    """proj_in [dim,E], 4 x (attention, feed-forward) at width dim, proj_out [out,dim], norm_out [out]."""
    inner = heads * 64
    shapes = {"proj_in.weight": (dim, embed_dim), "proj_in.bias": (dim,),
              "proj_out.weight": (out_dim, dim), "proj_out.bias": (out_dim,),
              "norm_out.weight": (out_dim,), "norm_out.bias": (out_dim,)}
    for i in range(4):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        shapes.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,),
                       a + "norm2.weight": (dim,), a + "norm2.bias": (dim,),
                       a + "to_q.weight": (inner, dim), a + "to_kv.weight": (2 * inner, dim),
                       a + "to_out.weight": (dim, inner),
                       f + "0.weight": (dim,), f + "0.bias": (dim,),
                       f + "1.weight": (4 * dim, dim), f + "3.weight": (dim, 4 * dim)})
    return shapes


def _face_mlp(tokens: int, out_dim: int) -> dict[str, tuple]:
    """proj.0 [1024,512], GELU, proj.2 [T*out,1024], norm [out]."""
    return {"proj.0.weight": (2 * FACE_DIM, FACE_DIM), "proj.0.bias": (2 * FACE_DIM,),
            "proj.2.weight": (tokens * out_dim, 2 * FACE_DIM), "proj.2.bias": (tokens * out_dim,),
            "norm.weight": (out_dim,), "norm.bias": (out_dim,)}


def image_proj_shapes(v: AdapterVariant) -> dict[str, tuple]:
    """Key -> shape of the ``image_proj`` group."""
    E, T, D = v.embed_dim, v.tokens, v.out_dim
    if v.proj == "linear":
        return {"proj.weight": (T * D, E), "proj.bias": (T * D,), "norm.weight": (D,), "norm.bias": (D,)}
    if v.proj == "mlp":
        return {"proj.0.weight": (E, E), "proj.0.bias": (E,), "proj.2.weight": (D, E), "proj.2.bias": (D,),
                "proj.3.weight": (D,), "proj.3.bias": (D,)}
    if v.proj == "resampler":
        return {"latents": (1, T, v.dim), **_perceiver(v.dim, v.heads, E, D)}
    if v.proj == "faceid":
        return _face_mlp(T, D)
    if v.proj == "faceid_plus":
        resampler = _perceiver(D, D // 64, E, D)
        return {**_face_mlp(T, D), **{f"perceiver_resampler.{k}": s for k, s in resampler.items()}}
    raise ValueError(f"unknown projection type {v.proj!r}")


def ip_adapter_shapes(v: AdapterVariant, widths: tuple[int, ...] | None = None) -> dict[str, tuple]:
    """Key -> shape of the ``ip_adapter`` group: to_k_ip/to_v_ip [C,D] at odd ids, LoRA at all ids.
    ``widths`` replaces the real UNet's layer widths (for adapters that fit a tiny test UNet)."""
    D, shapes = v.cross_dim, {}
    for layer, C in enumerate(widths or CROSS_WIDTHS[v.base]):
        if v.lora:
            for pid, kv_in in ((2 * layer, C), (2 * layer + 1, D)):  # attn1 (self), attn2 (cross)
                for name, fan_in in (("q", C), ("k", kv_in), ("v", kv_in), ("out", C)):
                    shapes[f"{pid}.to_{name}_lora.down.weight"] = (LORA_RANK, fan_in)
                    shapes[f"{pid}.to_{name}_lora.up.weight"] = (C, LORA_RANK)
        pid = 2 * layer + 1
        shapes[f"{pid}.to_k_ip.weight"] = (C, D)
        shapes[f"{pid}.to_v_ip.weight"] = (C, D)
    return shapes


def _is_layer_norm(key: str) -> bool:
    """LayerNorm weights whose names the pool's norm rule cannot see: proj.3 and the FF's first module."""
    return key.endswith(("proj.3.weight", ".1.0.weight"))


def adapter_state_dict(v: AdapterVariant, seed: int = 0,
                       widths: tuple[int, ...] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., v.attn_group: ...} of fp16 views into shared random pools."""
    pools = WeightPools(seed)
    out = {}
    for group, shapes in (("image_proj", image_proj_shapes(v)), (v.attn_group, ip_adapter_shapes(v, widths))):
        sd = pools.state_dict({k: torch.Size(s) for k, s in shapes.items()})
        for key in filter(_is_layer_norm, list(sd)):
            sd[key] = pools.view(shapes[key], "ones")
        out[group] = sd
    return out
