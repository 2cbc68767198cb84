"""The one table of IP-Adapter variants: what each file holds, what it needs, and how to tell it apart.

Every other part of the pack (detection, loading, the inspect command, encoder checks and their
error messages) reads these rows. A row is recognised from the file's keys and shapes; where shapes
cannot tell variants apart (light, plus-face, composition, FaceID-Plus v1/v2, portrait v11), a
file-name hint picks the row, and the first row of a shape group is the default.
"""
from __future__ import annotations

from dataclasses import dataclass

# CLIP vision encoders the public adapters were trained with: hidden width, projection width, input size, the file
# name users know it by and the Hugging Face repository that publishes it.
ENCODERS = {
    "ViT-H-14": dict(hidden=1280, projection=1024, image_size=224,
                     file="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", source="h94/IP-Adapter (models/image_encoder)"),
    "ViT-bigG-14": dict(hidden=1664, projection=1280, image_size=224,
                        file="CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                        source="h94/IP-Adapter (sdxl_models/image_encoder)"),
    "ViT-L-14-336": dict(hidden=1024, projection=768, image_size=336,
                         file="clip-vit-large-patch14-336.bin", source="openai/clip-vit-large-patch14-336"),
    "ViT-L-14": dict(hidden=1024, projection=768, image_size=224, file="clip_vision_l.safetensors",
                     source="openai/clip-vit-large-patch14"),
    # SigLIP has no projection: its hidden states are what an adapter reads, and only their width is compared.
    # Its attention-pooled output (the "pooler output", InstantX's Flux adapter) needs the pooling head's 16 heads.
    "SigLIP-so400m-384": dict(hidden=1152, projection=None, image_size=384, file="sigclip_vision_patch14_384.safetensors",
                              source="google/siglip-so400m-patch14-384", pooling_heads=16),
}
FACE_EMBEDDING = "face-embedding"  # InsightFace ArcFace, 512 values per face

# Model families by the width D of what the image K/V are made from (the in-dim of every to_k_ip / to_v_ip):
# a UNet's cross-attention context, or for Flux the image tokens' own width (its text encoder's, T5's 4096).
# ``layers``: the patched attentions of the full model (UNet cross-attentions, Flux double-stream or MMDiT joint
# blocks).
BASES = {"sd15": dict(context_dim=768, layers=16), "sdxl": dict(context_dim=2048, layers=70),
         "kolors": dict(context_dim=2048, layers=70), "flux": dict(context_dim=4096, layers=19),
         "sd35": dict(context_dim=None, layers=38)}  # sd35: D is the transformer's own width
DIT_BASES = ("flux", "sd35")  # adapter files number their layers by block, 0, 1, 2, ...

# Projection kinds (image_proj layouts):
#   linear       proj [T*D, E], norm [D]: pooled image_embeds -> T tokens
#   resampler    latents [1, T, dim] + 4 perceiver layers: hidden states (or a face vector) -> T tokens
#   mlp          proj.0 [E, E], proj.2 [D, E], proj.3 [D]: each hidden-state token -> one token (257)
#   faceid       proj.0 [2E, E], proj.2 [T*D, 2E], norm [D]: one vector -> T tokens (a face embedding; SigLIP's
#                pooled output for InstantX's Flux adapter)
#   faceid_plus  faceid MLP, then a latent-free perceiver over CLIP hidden states (perceiver_resampler.*)
#   time_resampler  a resampler modulated by the timestep at every layer (time_embedding.*): runs at each step
PROJECTIONS = ("linear", "resampler", "mlp", "faceid", "faceid_plus", "time_resampler")

# How the image attention enters the model (the mechanisms of ``nodes/patch``, one module each):
#   unet_cross_attention  the host's attn2 replace patch of every UNet cross-attention layer
#   flux_double_blocks    a DiT block patch of each Flux double-stream block, the term added after the block (XLabs)
#   flux_block_attention  the term added to every Flux block's attention output, double and single (InstantX)
#   sd35_joint_blocks     a DiT block patch of each MMDiT joint block, image K/V joined to its attention (InstantX)
PATCH_MECHANISMS = ("unet_cross_attention", "flux_double_blocks", "flux_block_attention", "sd35_joint_blocks")


@dataclass(frozen=True)
class Variant:
    name: str                 # e.g. "plus-face_sd15"
    base: str                 # "sd15" | "sdxl" | "kolors"
    projection: str           # one of PROJECTIONS
    embed_dim: int            # E: width of what image_proj takes (CLIP embeds/hidden, or 512 for a face)
    tokens: int               # image tokens per image
    encoder: str              # a key of ENCODERS, or FACE_EMBEDDING
    encoder_output: str       # "image_embeds" | "penultimate" | "pooled" (SigLIP's attention pooling) | "face"
    faceid_lora: bool = False
    shortcut: bool = False    # FaceID-Plus v2: id tokens + s * perceiver output
    hint: str = ""            # file-name fragment that selects this row within its shape group
    clip_encoder: str = ""    # FaceID-Plus: the CLIP encoder of the face crop (penultimate states)
    # The negative side's embeds without a negative image, as the references make them: zeros for pooled and face
    # embeds, the CLIP encoding of an image of CLIP's mean colour for hidden states, of a black image for XLabs'
    # Flux adapters (XLabs' nodes and diffusers' Flux pipeline), zero hidden states for InstantX's SD3.5 adapter
    # (diffusers' SD3 pipeline): "" (by encoder_output), "black image" or "zeros".
    uncond_image: str = ""
    # InstantX's Flux adapter: image attention also on the single-stream blocks (numbered after the double-stream
    # ones), its keys RMS-normed per head of ``k_norm_head_dim`` channels.
    single_blocks: bool = False
    k_norm_head_dim: int = 0
    patch: str = "unet_cross_attention"  # one of PATCH_MECHANISMS

    @property
    def context_dim(self) -> int | None:
        """D, or None where it is the model's own width (SD3.5)."""
        return BASES[self.base]["context_dim"]


_H, _G, _L336, _L = "ViT-H-14", "ViT-bigG-14", "ViT-L-14-336", "ViT-L-14"

VARIANTS: tuple[Variant, ...] = (
    Variant("base_sd15", "sd15", "linear", 1024, 4, _H, "image_embeds"),
    Variant("light_sd15", "sd15", "linear", 1024, 4, _H, "image_embeds", hint="light"),
    Variant("vit-g_sd15", "sd15", "linear", 1280, 4, _G, "image_embeds"),
    Variant("plus_sd15", "sd15", "resampler", 1280, 16, _H, "penultimate"),
    Variant("plus-face_sd15", "sd15", "resampler", 1280, 16, _H, "penultimate", hint="face"),
    Variant("composition_sd15", "sd15", "resampler", 1280, 16, _H, "penultimate", hint="composition"),
    Variant("full-face_sd15", "sd15", "mlp", 1280, 257, _H, "penultimate"),
    Variant("faceid_sd15", "sd15", "faceid", 512, 4, FACE_EMBEDDING, "face", faceid_lora=True),
    Variant("portrait_sd15", "sd15", "faceid", 512, 16, FACE_EMBEDDING, "face"),
    Variant("portrait-v11_sd15", "sd15", "faceid", 512, 16, FACE_EMBEDDING, "face", hint="v11"),
    Variant("faceid-plus_sd15", "sd15", "faceid_plus", 512, 4, FACE_EMBEDDING, "face", faceid_lora=True,
            clip_encoder=_H),
    Variant("faceid-plusv2_sd15", "sd15", "faceid_plus", 512, 4, FACE_EMBEDDING, "face", faceid_lora=True,
            shortcut=True, hint="plusv2", clip_encoder=_H),
    Variant("base_sdxl", "sdxl", "linear", 1280, 4, _G, "image_embeds"),
    Variant("vit-h_sdxl", "sdxl", "linear", 1024, 4, _H, "image_embeds"),
    Variant("plus_sdxl", "sdxl", "resampler", 1280, 16, _H, "penultimate"),
    Variant("plus-face_sdxl", "sdxl", "resampler", 1280, 16, _H, "penultimate", hint="face"),
    Variant("composition_sdxl", "sdxl", "resampler", 1280, 16, _H, "penultimate", hint="composition"),
    Variant("portrait-unnorm_sdxl", "sdxl", "resampler", 512, 16, FACE_EMBEDDING, "face"),
    Variant("faceid_sdxl", "sdxl", "faceid", 512, 4, FACE_EMBEDDING, "face", faceid_lora=True),
    Variant("portrait_sdxl", "sdxl", "faceid", 512, 16, FACE_EMBEDDING, "face"),
    # Only a v2 FaceID-Plus exists for SDXL, so the shortcut is on without a hint.
    Variant("faceid-plusv2_sdxl", "sdxl", "faceid_plus", 512, 4, FACE_EMBEDDING, "face", faceid_lora=True,
            shortcut=True, clip_encoder=_H),
    Variant("plus_kolors", "kolors", "resampler", 1024, 16, _L336, "penultimate"),
    Variant("faceid-plus_kolors", "kolors", "faceid_plus", 512, 6, FACE_EMBEDDING, "face", shortcut=True,
            clip_encoder=_L336),
    # XLabs' Flux adapters: image K/V (with biases) on the 19 double-stream blocks; v2 has 16 tokens.
    Variant("xlabs_flux", "flux", "linear", 768, 4, _L, "image_embeds", uncond_image="black image",
            patch="flux_double_blocks"),
    Variant("xlabs-v2_flux", "flux", "linear", 768, 16, _L, "image_embeds", uncond_image="black image",
            patch="flux_double_blocks"),
    # InstantX's FLUX.1-dev adapter: SigLIP's pooled output through an MLP to 128 tokens, image attention in all 57
    # blocks (added to each block's attention output, before its projection).
    Variant("instantx_flux", "flux", "faceid", 1152, 128, "SigLIP-so400m-384", "pooled", uncond_image="zeros",
            single_blocks=True, k_norm_head_dim=128, patch="flux_block_attention"),
    # InstantX's SD3.5-Large adapter: image attention in the 38 joint blocks, tokens from a time-conditioned resampler.
    Variant("instantx_sd35", "sd35", "time_resampler", 1152, 64, "SigLIP-so400m-384", "penultimate",
            uncond_image="zeros", patch="sd35_joint_blocks"),
)

BY_NAME = {v.name: v for v in VARIANTS}


def encoder_of(hidden: int, projection: int, image_size: int | None = None) -> str | None:
    """The name of the CLIP vision encoder with these widths (and input size, where given: ViT-L/14 comes
    at 224 and 336 px), if it is one the table knows."""
    return next((name for name, e in ENCODERS.items() if (e["hidden"], e["projection"] or projection) == (hidden, projection)
                 and image_size in (None, e["image_size"])), None)


def check_encoder(variant: Variant, adapter_name: str, hidden: int, projection: int,
                  image_size: int | None = None) -> None:
    """Raise ValueError, naming the encoder and file the adapter needs, unless the CLIP vision widths (and input
    size, where given) fit."""
    needed = ENCODERS.get(variant.encoder)
    if needed is None:
        raise ValueError(f"{adapter_name} ({variant.name}) takes a face embedding, not a CLIP vision image encoding")
    if (needed["hidden"], needed["projection"] or projection) != (hidden, projection) or \
            image_size not in (None, needed["image_size"]):
        found = encoder_of(hidden, projection, image_size) or (
            f"an unknown encoder (hidden width {hidden}, projection {projection}"
            + (f", {image_size} px" if image_size else "") + ")")
        raise ValueError(f"{adapter_name} ({variant.name}) needs the CLIP vision {variant.encoder} ({needed['file']}, "
                         f"hidden width {needed['hidden']}, {needed['image_size']} px); the connected CLIP vision "
                         f"is {found}")


def check_embeds(variant: Variant, adapter_name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError, naming what the adapter takes and from which encoder, unless ``shape`` (of an
    EMBEDS tensor) is what its projection reads: [n, E] pooled or face embeds, [n, N, E] hidden states."""
    rank = 3 if variant.encoder_output == "penultimate" else 2
    if len(shape) == rank and shape[-1] == variant.embed_dim and shape[0] > 0:
        return
    what = {"image_embeds": f"pooled image_embeds [n, {variant.embed_dim}] of the CLIP vision {variant.encoder}",
            "penultimate": f"penultimate hidden states [n, tokens, {variant.embed_dim}] of the CLIP vision "
                           f"{variant.encoder}",
            "pooled": f"pooled outputs [n, {variant.embed_dim}] of the CLIP vision {variant.encoder}",
            "face": f"face embeddings [n, {variant.embed_dim}] (InsightFace)"}[variant.encoder_output]
    raise ValueError(f"embeds: {adapter_name} ({variant.name}) takes {what}; got a tensor of shape {tuple(shape)}")


def layout_mates(variant: Variant) -> tuple[Variant, ...]:
    """The rows whose files have ``variant``'s keys and shapes (only a file's name tells them apart; the first
    without a hint is what such a file is read as when its name names none)."""
    layout = lambda v: (v.base, v.projection, v.embed_dim, v.tokens, v.faceid_lora)
    return tuple(v for v in VARIANTS if layout(v) == layout(variant))
