"""Image prompts on Flux: XLabs' image attention after each double-stream block, through the host's DiT block patch.

For double-stream block i, as XLabs trained it (and as diffusers' FluxIPAdapterAttnProcessor computes it):

    img_out = block(img, txt, vec, pe).img + sum_a w_a[i] * Attn(q_i, K_a,i, V_a,i)

q_i [B, N, 3072] is the block's own image-stream query: the modulated LayerNorm of the block's input ``img``, the q
third of its qkv projection, RMS-normed per head, before RoPE. K/V [T, 3072] are the adapter's biased projections
of the image tokens [T, 4096]. The term is added ungated, after the block's attention and MLP, to the generated
latent's tokens (not to Kontext reference tokens that follow them). The query runs through the block's own modules,
so fp8 or LoRA-patched weights are read as the block reads them.
"""
from __future__ import annotations

import math

import comfy.patcher_extension
import torch

from ..ipadapter_core.adapter_spec import AdapterSpec
from ..ipadapter_core.attention import ImageAttention
from .host_hooks import DIT_BLOCK, tag_uncond_conds, uncond_chunks, window_frames

LATENT_WRAPPER_KEY = "image_prompt_latent_size"


class LatentSize:
    """The latent height and width of the model call in progress, recorded by a DIFFUSION_MODEL wrapper: the
    block patches see only the patchified tokens, and masks need the grid (any aspect ratio)."""

    def __init__(self):
        self.hw: tuple[int, int] | None = None

    def record(self, executor, x, *args, **kwargs):
        self.hw = tuple(x.shape[-2:])
        try:
            return executor(x, *args, **kwargs)
        finally:
            self.hw = None  # a later call without the wrapper must not see this size

    def grid(self, patch_size: int) -> tuple[int, int] | None:
        """The token grid (h, w) of the latent, patches of ``patch_size`` rounded up as the host pads them."""
        return self.hw and tuple(math.ceil(side / patch_size) for side in self.hw)


def image_query(block, img: torch.Tensor, vec) -> torch.Tensor:
    """The double-stream block's image-stream query for ``img`` [B, N, C], RMS-normed per head, before RoPE:
    [B, N, C]."""
    if block.modulation:
        mod, _ = block.img_mod(vec)
    else:  # Chroma-style blocks get their modulations precomputed
        (mod, _), _ = vec
    modulated = torch.addcmul(mod.shift, block.img_norm1(img), 1 + mod.scale)
    q = block.img_attn.qkv(modulated)[..., :block.hidden_size].unflatten(-1, (block.num_heads, -1))
    return block.img_attn.norm.query_norm(q).flatten(2)


class FluxImagePrompt(ImageAttention):
    """The ("dit", "double_block", i) patch of every double-stream block of one patched Flux model. ``blocks`` are
    the model's double-stream blocks; ``inner`` the block patches that were there before (another pack's), run in
    place of the plain block."""

    def __init__(self, blocks, adapters: tuple[AdapterSpec, ...], latent: LatentSize, patch_size: int,
                 inner: dict[int, object]):
        super().__init__(adapters, len(blocks), uncond_chunks, window_frames)
        self.blocks = blocks
        self.latent = latent
        self.patch_size = patch_size
        self.inner = inner

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        index = options["block_index"]
        block = self.blocks[index]
        img = args["img"]
        q = image_query(block, img, args["vec"]) if self.groups[index] else None  # before the block updates img
        inner = self.inner.get(index)
        out = inner(args, extra) if inner is not None else extra["original_block"](args)
        if q is None:
            return out
        grid = self.latent.grid(self.patch_size)
        rows = grid[0] * grid[1] if grid else q.shape[1]
        image = out["img"]
        self.add_image_attention(q[:, :rows], image[:, :rows], index, block.num_heads,
                                 self.layout(options, q.shape[0]), False, grid, options.get("sigmas"))
        return out


def patch_flux(model_patcher, spec: AdapterSpec):
    """A clone of ``model_patcher`` (a Flux model) with ``spec`` added to its double-stream blocks' image attention."""
    flux = model_patcher.get_model_object("diffusion_model")
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    previous = replaces.get((DIT_BLOCK, 0))
    if isinstance(previous, FluxImagePrompt):
        adapters, latent, inner = previous.adapters + (spec,), previous.latent, previous.inner
    else:
        adapters, latent = (spec,), LatentSize()
        inner = {i: replaces[(DIT_BLOCK, i)] for i in range(len(flux.double_blocks)) if (DIT_BLOCK, i) in replaces}
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, LATENT_WRAPPER_KEY,
                                     latent.record)
    patch = FluxImagePrompt(flux.double_blocks, adapters, latent, flux.patch_size, inner)
    for i in range(len(flux.double_blocks)):
        patched.set_model_patch_replace(patch, "dit", DIT_BLOCK, i)
    tag_uncond_conds(patched)
    return patched
