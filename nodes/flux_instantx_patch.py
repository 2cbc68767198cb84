"""Image prompts on Flux: InstantX's image attention inside every block's attention, through the host's DiT block
patches and its attention override.

In double-stream block i and single-stream block j (layer 19 + j of FLUX.1-dev), as InstantX trained it (and as
DiffSynth-Studio's Flux model computes it):

    attn_out[rows] += w_a[layer] * Attn(q[rows], RMS(K_a,layer), V_a,layer)

attn_out [B, L, 3072] is the block's attention output before its output projection (then gated, and the MLP runs
on the result), q [B, 24, L, 128] the block's own RMS-normed query before RoPE, and K/V [T, 3072] the adapter's
bias-free projections of the 128 image tokens, K RMS-normed per head. ``rows`` are the image stream's rows in a
double-stream block and every row (text and image) in a single-stream block. The block patch records the block's
RoPE matrices and rows; the attention override, called by the block itself, gets q after RoPE, undoes the rotation
(``unrotate``) and adds the term to the attention's output, so the block's own projections, norms and weights
(fp8, LoRA) run unchanged. A mask limits an adapter to a region of the image rows; text rows get only the terms
of adapters without a mask.
"""
from __future__ import annotations

import comfy.patcher_extension

from ..ipadapter_core.adapter_spec import AdapterSpec
from ..ipadapter_core.attention import ImageAttention
from ..ipadapter_core.rotary import unrotate
from .flux_patch import LATENT_WRAPPER_KEY, LatentSize
from .ipadapter_patch import DIT_BLOCK, SINGLE_BLOCK, tag_uncond_conds, uncond_chunks, window_frames

OVERRIDE_KEY = "optimized_attention_override"  # the host's attention override in transformer_options


class InstantXImagePrompt(ImageAttention):
    """The block patches and attention override of one patched Flux model. ``inner`` holds the block patches that
    were there before (another pack's, by (block kind, index)), run in place of the plain block; ``previous`` the
    attention override that was there before, called in place of the host's attention."""

    def __init__(self, flux, adapters: tuple[AdapterSpec, ...], latent: LatentSize, inner: dict, previous):
        self.doubles = len(flux.double_blocks)
        super().__init__(adapters, self.doubles + len(flux.single_blocks), uncond_chunks, window_frames)
        self.flipped = [getattr(block, "flipped_img_txt", False) for block in flux.double_blocks]
        self.patch_size = flux.patch_size
        self.latent, self.inner, self.previous = latent, inner, previous
        self.text_rows = ImageAttention(adapters, len(self.groups), uncond_chunks, window_frames)
        self.text_rows.groups = {layer: unmasked(groups, adapters) for layer, groups in self.groups.items()}
        self.pending = None  # (layer, RoPE matrices, text rows, image rows first) of the block in progress
        self.text_count = 0  # text rows of this model call (from its double-stream blocks)

    def block(self, args: dict, extra: dict) -> dict:
        """The ("dit", kind, i) patch: note what the block's attention needs, run the block."""
        index = args["transformer_options"]["block_index"]
        double = "txt" in args  # a single-stream block gets text and image as one sequence
        layer = index if double else self.doubles + index
        if double:
            self.text_count = args["txt"].shape[1]
        if self.groups[layer]:
            self.pending = (layer, args["pe"], self.text_count, double and self.flipped[index])
        try:
            inner = self.inner.get((DIT_BLOCK if double else SINGLE_BLOCK, index))
            return inner(args, extra) if inner is not None else extra["original_block"](args)
        finally:
            self.pending = None

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        """The attention override: the host's attention (or the override before ours), plus the image terms when
        the call is a patched block's own attention (q [B, H, L, D] after RoPE, out [B, L, H*D])."""
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        pending, self.pending = self.pending, None  # one attention per block
        if pending is None or not kwargs.get("skip_reshape") or q.shape[2] != out.shape[1]:
            return out
        layer, pe, text, image_first = pending
        options = kwargs.get("transformer_options") or {}
        query = unrotate(q, pe).transpose(1, 2).flatten(2)  # [B, L, H*D]
        grid = self.latent.grid(self.patch_size)
        length = q.shape[2]
        image = slice(0, length - text) if image_first else slice(text, length)
        rows = grid[0] * grid[1] if grid else image.stop - image.start  # the latent's own tokens (not Kontext's)
        image_rows = slice(image.start, image.start + rows)
        layout = self.layout(options, q.shape[0])
        sigmas = options.get("sigmas")
        self.add_image_attention(query[:, image_rows], out[:, image_rows], layer, heads, layout, False, grid, sigmas)
        if layer >= self.doubles:  # a single-stream block: its text rows (and Kontext reference rows) too
            rest = (slice(0, image_rows.start), slice(image_rows.stop, length))
        else:  # Kontext reference rows after the latent's in the image stream
            rest = (slice(image_rows.stop, image.stop),)
        for part in rest:
            if part.stop > part.start:
                self.text_rows.add_image_attention(query[:, part], out[:, part], layer, heads, layout, False, None,
                                                   sigmas)
        return out


def unmasked(groups: tuple[tuple[int, ...], ...], adapters: tuple[AdapterSpec, ...]) -> tuple[tuple[int, ...], ...]:
    """Token groups without their adapters that have a mask (and without groups left empty)."""
    kept = (tuple(i for i in group if adapters[i].mask is None) for group in groups)
    return tuple(group for group in kept if group)


def patch_flux_instantx(model_patcher, spec: AdapterSpec):
    """A clone of ``model_patcher`` (a Flux model) with ``spec`` added to the image attention of all its blocks."""
    flux = model_patcher.get_model_object("diffusion_model")
    patched = model_patcher.clone()
    options = patched.model_options["transformer_options"]
    replaces = options.get("patches_replace", {}).get("dit", {})
    override = options.get(OVERRIDE_KEY)
    keys = [(DIT_BLOCK, i) for i in range(len(flux.double_blocks))] + \
        [(SINGLE_BLOCK, i) for i in range(len(flux.single_blocks))]
    earlier = getattr(override, "__self__", None)
    if isinstance(earlier, InstantXImagePrompt):
        patch = InstantXImagePrompt(flux, earlier.adapters + (spec,), earlier.latent, earlier.inner, earlier.previous)
    else:
        latent = LatentSize()
        patch = InstantXImagePrompt(flux, (spec,), latent, {key: replaces[key] for key in keys if key in replaces},
                                    override)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, LATENT_WRAPPER_KEY,
                                     latent.record)
    for kind, index in keys:
        patched.set_model_patch_replace(patch.block, "dit", kind, index)
    # a new dict, as the host's own setters make one: clones share nothing they could change
    patched.model_options["transformer_options"] = {**patched.model_options["transformer_options"],
                                                    OVERRIDE_KEY: patch.attention}
    tag_uncond_conds(patched)
    return patched
