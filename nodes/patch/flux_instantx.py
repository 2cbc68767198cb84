"""Image prompts on Flux: InstantX's image attention inside every block's attention, through the host's attention
patches where its Flux blocks call them, else through its DiT block patches and its attention override.

In double-stream block i and single-stream block j (layer 19 + j of FLUX.1-dev), as InstantX trained it (and as
DiffSynth-Studio's Flux model computes it):

    attn_out[rows] += w_a[layer] * Attn(q[rows], RMS(K_a,layer), V_a,layer)

attn_out [B, L, 3072] is the block's attention output before its output projection (then gated, and the MLP runs
on the result), q [B, 24, L, 128] the block's own RMS-normed query before RoPE, and K/V [T, 3072] the adapter's
bias-free projections of the 128 image tokens, K RMS-normed per head. ``rows`` are the image stream's rows in a
double-stream block and every row (text and image) in a single-stream block. Where the host's blocks call
``attn1_patch`` (with the query before RoPE) and ``attn1_output_patch`` (with the attention output), the first
notes the query in the block call's own options and the second adds the term (``InstantXAttentionPatches``).
Elsewhere a block patch records the block's RoPE matrices and rows, and the attention override, called by the
block itself, gets q after RoPE, undoes the rotation (``unrotate``) and adds the term to the attention's output
(``InstantXBlockPatches``). Either way the block's own projections, norms and weights (fp8, LoRA) run unchanged.
A mask limits an adapter to a region of the image rows; text rows get only the terms of adapters without a mask.
"""
from __future__ import annotations

import functools
import threading

import comfy.patcher_extension

from ...ipadapter_core.adapter_spec import AdapterSpec
from ...ipadapter_core.attention import ImageAttention
from ...ipadapter_core.rotary import unrotate
from .hooks import (DIT_BLOCK, SINGLE_BLOCK, CallCount, ModelCall, record_model_call, tag_uncond_conds,
                    uncond_chunks, watch, window_frames)
from .layers import ModelFit

OVERRIDE_KEY = "optimized_attention_override"  # the host's attention override in transformer_options
QUERY_PATCH, OUTPUT_PATCH = "attn1_patch", "attn1_output_patch"  # the host's attention patches (in "patches")
QUERY_KEY = "image_prompt_instantx_query"  # the query our attn1_patch notes in one block call's options
LAYER_KIND = {True: "blocks' attention patches (attn1_patch, attn1_output_patch)",
              False: "blocks (DiT block patches and the attention override)"}  # by calls_attention_patches


class InstantXTerms(ImageAttention):
    """The image terms of one patched Flux model's adapters, added to a block's attention output; ``count`` counts
    the calls of its hooks (``hooks.watch``)."""

    def __init__(self, flux, adapters: tuple[AdapterSpec, ...], model_call: ModelCall, count: CallCount):
        self.count = count
        self.doubles = len(flux.double_blocks)
        super().__init__(adapters, self.doubles + len(flux.single_blocks), uncond_chunks, window_frames)
        self.patch_size = flux.patch_size
        self.model_call = model_call
        self.text_terms = ImageAttention(adapters, len(self.groups), uncond_chunks, window_frames)
        self.text_terms.groups = {layer: unmasked(groups, adapters) for layer, groups in self.groups.items()}

    def add_terms(self, query, out, layer: int, heads: int, image: slice, options: dict) -> None:
        """out [B, L, H*D] += the terms at ``layer`` for ``query`` [B, L, H*D] (the block's query before RoPE);
        ``image``: the image stream's rows (the latent's, then any Kontext reference rows)."""
        grid = self.model_call.grid(self.patch_size)
        length = query.shape[1]
        rows = grid[0] * grid[1] if grid else image.stop - image.start  # the latent's own tokens (not Kontext's)
        image_rows = slice(image.start, image.start + rows)
        layout = self.layout(options, query.shape[0])
        sigmas = options.get("sigmas")
        self.add_image_attention(query[:, image_rows], out[:, image_rows], layer, heads, layout, False, grid, sigmas)
        if layer >= self.doubles:  # a single-stream block: its text rows (and Kontext reference rows) too
            rest = (slice(0, image_rows.start), slice(image_rows.stop, length))
        else:  # Kontext reference rows after the latent's in the image stream
            rest = (slice(image_rows.stop, image.stop),)
        for part in rest:
            if part.stop > part.start:
                self.text_terms.add_image_attention(query[:, part], out[:, part], layer, heads, layout, False, None,
                                                   sigmas)


class InstantXAttentionPatches(InstantXTerms):
    """The attn1_patch and attn1_output_patch of one patched Flux model, on a host whose blocks call them."""

    def query(self, q, k, v, pe, attn_mask, extra_options: dict) -> dict:
        """The attn1_patch: note the block's query before RoPE (q [B, H, L, D]) in this block call's options (a copy
        per call, also handed to the output patch), change nothing."""
        self.count.ran()
        if self.groups[self.layer(extra_options)]:
            extra_options[QUERY_KEY] = q
        return {}

    def output(self, attn, extra_options: dict):
        """The attn1_output_patch: attn [B, L, H*D] plus the image terms for the query noted in this block call."""
        q = extra_options.pop(QUERY_KEY, None)
        if q is not None:
            self.add_terms(q.transpose(1, 2).flatten(2), attn, self.layer(extra_options), q.shape[1],
                           slice(*extra_options["img_slice"]), extra_options)
        return attn

    def layer(self, options: dict) -> int:
        index = options["block_index"]
        return index if options["block_type"] == "double" else self.doubles + index


class InstantXBlockPatches(InstantXTerms):
    """The block patches and attention override of one patched Flux model, on a host whose blocks call no attention
    patches. ``inner`` holds the block patches that were there before (another pack's, by (block kind, index)), run
    in place of the plain block; ``previous`` the attention override that was there before, called in place of the
    host's attention. What a block call notes for its attention is kept per thread (``call``): the host's multi-GPU
    samplers run calls of one model in several threads at once."""

    def __init__(self, flux, adapters: tuple[AdapterSpec, ...], model_call: ModelCall, count: CallCount, inner: dict,
                 previous):
        super().__init__(flux, adapters, model_call, count)
        self.flipped = [getattr(block, "flipped_img_txt", False) for block in flux.double_blocks]
        self.inner, self.previous = inner, previous
        # per thread: ``pending``, (layer, RoPE matrices, text rows, image rows first) of the block in progress, and
        # ``text_rows``, the text rows of this model call (from its double-stream blocks)
        self.call = threading.local()

    def block(self, args: dict, extra: dict) -> dict:
        """The ("dit", kind, i) patch: note what the block's attention needs, run the block."""
        self.count.ran()
        index = args["transformer_options"]["block_index"]
        double = "txt" in args  # a single-stream block gets text and image as one sequence
        layer = index if double else self.doubles + index
        if double:
            self.call.text_rows = args["txt"].shape[1]
        if self.groups[layer]:
            self.call.pending = (layer, args["pe"], getattr(self.call, "text_rows", 0), double and self.flipped[index])
        try:
            inner = self.inner.get((DIT_BLOCK if double else SINGLE_BLOCK, index))
            return inner(args, extra) if inner is not None else extra["original_block"](args)
        finally:
            self.call.pending = None

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        """The attention override: the host's attention (or the override before ours), plus the image terms when
        the call is a patched block's own attention (q [B, H, L, D] after RoPE, out [B, L, H*D])."""
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        pending, self.call.pending = getattr(self.call, "pending", None), None  # one attention per block
        if pending is None or not kwargs.get("skip_reshape") or q.shape[2] != out.shape[1]:
            return out
        layer, pe, text, image_first = pending
        length = q.shape[2]
        image = slice(0, length - text) if image_first else slice(text, length)
        self.add_terms(unrotate(q, pe).transpose(1, 2).flatten(2), out, layer, heads, image,
                       kwargs.get("transformer_options") or {})
        return out


def unmasked(groups: tuple[tuple[int, ...], ...], adapters: tuple[AdapterSpec, ...]) -> tuple[tuple[int, ...], ...]:
    """Token groups without their adapters that have a mask (and without groups left empty)."""
    kept = (tuple(i for i in group if adapters[i].mask is None) for group in groups)
    return tuple(group for group in kept if group)


def calls_attention_patches(flux) -> bool:
    """Whether every block of ``flux`` calls the host's ``attn1_patch`` and ``attn1_output_patch``.

    Read from the forward each block really runs (its own, or its class's: also one another pack put in place), not
    from a version: that function's code must name both keys among its constants, as a forward that looks them up
    does. Hosts whose Flux blocks call them hand ``attn1_patch`` the query before RoPE with the RoPE matrices (the
    attention applies them) and both patches one copy of the options per block call, with ``img_slice``,
    ``block_type`` and ``block_index``. A forward naming one key only (hosts with the output patch alone, a pack's
    rewrite that hands ``attn1_patch`` the rotated query), none, or no plain Python function keeps the block patches
    and the attention override, which need nothing of the blocks but the host's attention function."""
    return all(names_both_patches(getattr(getattr(block.forward, "__func__", block.forward), "__code__", None))
               for block in (*flux.double_blocks, *flux.single_blocks))


@functools.cache
def names_both_patches(code) -> bool:
    """Whether a forward's code object names both attention patch keys (once per function)."""
    return code is not None and {QUERY_PATCH, OUTPUT_PATCH} <= set(code.co_consts)


def applied(options: dict, kind: type[InstantXTerms]):
    """Our patch object of ``kind`` on a model with these transformer options, or None."""
    hooks = (*options.get("patches", {}).get(QUERY_PATCH, ()), options.get(OVERRIDE_KEY))
    return next((hook.__self__ for hook in hooks if isinstance(getattr(hook, "__self__", None), kind)), None)


def patch_flux_block_attention(model_patcher, spec: AdapterSpec, fit: ModelFit | None = None):
    """A clone of ``model_patcher`` (a Flux model) with ``spec`` added to the image attention of all its blocks."""
    flux = model_patcher.get_model_object("diffusion_model")
    patched = model_patcher.clone()
    attention_patches = calls_attention_patches(flux)
    earlier = applied(patched.model_options["transformer_options"],
                      InstantXAttentionPatches if attention_patches else InstantXBlockPatches)
    if earlier is None:
        adapters, count = (spec,), CallCount()
        model_call = record_model_call(patched, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    else:
        adapters, model_call, count = earlier.adapters + (spec,), earlier.model_call, earlier.count
    (set_attention_patches if attention_patches else set_block_patches)(patched, flux, adapters, model_call, count,
                                                                        earlier)
    tag_uncond_conds(patched)
    watch(patched, LAYER_KIND[attention_patches], count)
    return patched


def set_attention_patches(patched, flux, adapters: tuple[AdapterSpec, ...], model_call: ModelCall, count: CallCount,
                          earlier) -> None:
    """Our attn1_patch and attn1_output_patch on ``patched``: after the other packs' ones, or in the places of
    ``earlier`` (ours, with the adapters before this one)."""
    patch = InstantXAttentionPatches(flux, adapters, model_call, count)
    if earlier is None:
        patched.set_model_attn1_patch(patch.query)
        patched.set_model_attn1_output_patch(patch.output)
        return
    patches = patched.model_options["transformer_options"]["patches"]  # the clone's own (it copies dicts and lists)
    for name, hook in ((QUERY_PATCH, patch.query), (OUTPUT_PATCH, patch.output)):
        patches[name] = [hook if getattr(other, "__self__", None) is earlier else other for other in patches[name]]


def set_block_patches(patched, flux, adapters: tuple[AdapterSpec, ...], model_call: ModelCall, count: CallCount,
                      earlier) -> None:
    """Our patch of every block of ``patched`` and our attention override, around the block patches and override
    that were there before ours (those ``earlier``, ours with the adapters before this one, wraps)."""
    options = patched.model_options["transformer_options"]
    keys = [(DIT_BLOCK, i) for i in range(len(flux.double_blocks))] + \
        [(SINGLE_BLOCK, i) for i in range(len(flux.single_blocks))]
    if earlier is None:
        replaces = options.get("patches_replace", {}).get("dit", {})
        inner, previous = {key: replaces[key] for key in keys if key in replaces}, options.get(OVERRIDE_KEY)
    else:
        inner, previous = earlier.inner, earlier.previous
    patch = InstantXBlockPatches(flux, adapters, model_call, count, inner, previous)
    for kind, index in keys:
        patched.set_model_patch_replace(patch.block, "dit", kind, index)
    # a new dict, as the host's own setters make one: clones share nothing they could change
    patched.model_options["transformer_options"] = {**patched.model_options["transformer_options"],
                                                    OVERRIDE_KEY: patch.attention}
