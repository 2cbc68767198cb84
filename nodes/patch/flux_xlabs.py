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

import comfy.patcher_extension
import torch

from ...ipadapter_core.adapter_spec import AdapterSpec
from ...ipadapter_core.attention import ImageAttention
from .hooks import (DIT_BLOCK, CallCount, ModelCall, record_model_call, tag_uncond_conds, uncond_chunks, watch,
                    window_frames)
from .layers import ModelFit

LAYER_KIND = "double-stream blocks (DiT block patches)"


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
    """The ("dit", "double_block", i) patch of every double-stream block of one patched Flux model. ``flux`` is the
    patched model (the blocks used are the running model's: ``hooks.ModelCall``); ``inner`` the block patches that were there before (another pack's), run in
    place of the plain block; ``count`` counts the calls (``hooks.watch``)."""

    def __init__(self, flux, adapters: tuple[AdapterSpec, ...], model_call: ModelCall, patch_size: int,
                 inner: dict[int, object], count: CallCount):
        super().__init__(adapters, len(flux.double_blocks), uncond_chunks, window_frames)
        self.flux = flux
        self.model_call = model_call
        self.patch_size = patch_size
        self.inner = inner
        self.count = count

    def __call__(self, args: dict, extra: dict) -> dict:
        self.count.ran()
        options = args["transformer_options"]
        index = options["block_index"]
        block = self.model_call.running(self.flux).double_blocks[index]
        img = args["img"]
        q = image_query(block, img, args["vec"]) if self.groups[index] else None  # before the block updates img
        inner = self.inner.get(index)
        out = inner(args, extra) if inner is not None else extra["original_block"](args)
        if q is None:
            return out
        grid = self.model_call.grid(self.patch_size)
        rows = grid[0] * grid[1] if grid else q.shape[1]
        image = out["img"]
        self.add_image_attention(q[:, :rows], image[:, :rows], index, block.num_heads,
                                 self.layout(options, q.shape[0]), False, grid, options.get("sigmas"))
        return out


def patch_flux_double_blocks(model_patcher, spec: AdapterSpec, fit: ModelFit | None = None):
    """A clone of ``model_patcher`` (a Flux model) with ``spec`` added to its double-stream blocks' image attention."""
    flux = model_patcher.get_model_object("diffusion_model")
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    earlier = replaces.get((DIT_BLOCK, 0))
    if isinstance(earlier, FluxImagePrompt):
        adapters, model_call, inner, count = earlier.adapters + (spec,), earlier.model_call, earlier.inner, earlier.count
    else:
        adapters, count = (spec,), CallCount()
        inner = {i: replaces[(DIT_BLOCK, i)] for i in range(len(flux.double_blocks)) if (DIT_BLOCK, i) in replaces}
        model_call = record_model_call(patched, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    patch = FluxImagePrompt(flux, adapters, model_call, flux.patch_size, inner, count)
    for i in range(len(flux.double_blocks)):
        patched.set_model_patch_replace(patch, "dit", DIT_BLOCK, i)
    tag_uncond_conds(patched)
    watch(patched, LAYER_KIND, count)
    return patched
