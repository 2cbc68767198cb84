"""Decoupled cross-attention (IP-Adapter, arXiv 2308.06721, eq. 5): the image terms, and the UNet's replacement.

    Z = Attn(Q, K_text, V_text) + sum_a w_a[layer] * Attn(Q, K_a, V_a),   K_a = c_a W'_k,a,  V_a = c_a W'_v,a

Q, K_text and V_text arrive already projected by the frozen layer ([B, N, C] and [B, 77, C]); the result goes
to the layer's own ``to_out``. ``ImageAttention`` adds the image terms to any attention output (Flux's block
patches use it with the block's own query); ``DecoupledCrossAttention`` is the UNet's attn2 replacement. The
pieces, one concept each:
- ``adapter_spec``: an adapter's tokens, K/V weights, weights and limits; its K/V per layer, weights folded in;
- ``batched_kv``: those K/V laid out like the batch, cond or uncond tokens chosen by the conditioning that
  produced each chunk (never by its position), an unfolded batch's image by each latent's frame index, also
  when the sampler runs the UNet on a window of the frames (context windows);
- ``image_factor``: each adapter's mask on the layer's token grid and its sigma gate;
- ``attention_forms``: how the image attention runs on each device, adapters with the same number of
  image tokens together (one call, or one product).
Everything per run is made once and reused at every step; nothing is read back from a GPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from .adapter_spec import AdapterSpec
from .attention_forms import ScratchBuffers, attention_plan, head_major
from .batch_layout import BatchLayout, layout_of
from .batched_kv import BatchedImageKV
from .image_factor import ImageFactor, LayerGrid

# attention(q [B, N, C], k [B, M, C], v [B, M, C], heads, **options) -> [B, N, C]
AttentionFn = Callable[..., torch.Tensor]
LayerKey = tuple[str, int, int]  # (block name, block id, depth index in its transformer)


def token_groups(adapters: tuple[AdapterSpec, ...], layer: int) -> tuple[tuple[int, ...], ...]:
    """The adapters active at ``layer`` (weight not 0), grouped by image token count: each group attends together."""
    groups: dict[int, list[int]] = {}
    for index, adapter in enumerate(adapters):
        if adapter.layer_weights[layer] != 0:
            groups.setdefault(adapter.tokens, []).append(index)
    return tuple(map(tuple, groups.values()))


class ImageAttention:
    """The image terms of one patched model's adapters, added to an attention output: made once per patch,
    shared by the UNet's cross-attention replacement and the DiT block patches.

    ``uncond_chunks(options)`` returns, per batch chunk, whether the chunk belongs to an unconditional
    (negative-side) conditioning. ``window_frames(options, rows)`` returns the frame index of each of a chunk's
    ``rows`` latents when the model runs on a window of the frames, or None when a chunk holds frames 0..rows-1."""

    def __init__(self, adapters: tuple[AdapterSpec, ...], layer_count: int,
                 uncond_chunks: Callable[[dict], tuple[bool, ...]],
                 window_frames: Callable[[dict, int], tuple[int, ...] | None] = lambda options, rows: None):
        self.adapters = adapters
        self.uncond_chunks = uncond_chunks
        self.window_frames = window_frames
        self.groups = {layer: token_groups(adapters, layer) for layer in range(layer_count)}
        self.kv = BatchedImageKV(adapters)
        self.factors = ImageFactor(adapters)
        self.scratch = ScratchBuffers()

    def layout(self, options: dict, batch: int) -> BatchLayout:
        """How this call's ``batch`` rows split into conditioning chunks (and frames)."""
        return layout_of(options, batch, self.uncond_chunks, self.window_frames)

    def add_image_attention(self, q: torch.Tensor, out: torch.Tensor, layer: int, heads: int, layout: BatchLayout,
                            upcast: bool, latent_hw: tuple[int, int] | None, sigmas: torch.Tensor | None) -> None:
        """out [B, N, C] += every active adapter's image term at ``layer`` for queries ``q`` [B, N, C] (N positions
        of the grid of a ``latent_hw`` latent, for masks), at the step of ``sigmas`` (for sigma ranges)."""
        n = q.shape[1]
        for group in self.groups[layer]:
            tokens = self.adapters[group[0]].tokens
            plan = attention_plan(q.device.type, tokens, upcast)
            factor = masked = None
            if self.factors.applies(group):
                grid = LayerGrid(group, n, latent_hw and tuple(latent_hw), q.device, q.dtype)
                factor = self.factors.factor(grid, layout, sigmas)
                if plan.reads_back:
                    if not factor.any():
                        continue  # outside every adapter's sigma range, or masked out everywhere on this layer
                    masked = self.factors.masked_rows(grid)
            kv = self.kv.for_form(plan.form, group, layer, layout, heads, q.device, q.dtype)
            scratch = None
            if plan.form.uses_scratch:
                scratch = self.scratch.take(plan.form.scratch_size(heads, len(group), tokens,
                                                                   n if masked is None else len(masked)), q)
            if masked is None:
                plan.form.add(head_major(q, heads), head_major(out, heads), kv, factor, len(group), upcast, scratch)
            else:  # only the query rows a mask covers: gathered, attended, added back
                q_rows = q.index_select(1, masked)
                term = torch.zeros_like(q_rows)
                plan.form.add(head_major(q_rows, heads), head_major(term, heads), kv, factor.index_select(2, masked),
                              len(group), upcast, scratch)
                out.index_add_(1, masked, term)

    def __deepcopy__(self, memo):
        """Hosts up to 0.3.x deep-copy model options on every clone (newer ones copy only the dicts and
        lists); either way clones share this object (its caches are keyed by layer, device, dtype and
        step, so clones may use them together)."""
        return self

    def to(self, *args, **kwargs):
        """The host moves patches with the model; K/V are cached per device and dtype, so nothing moves here."""
        return self


class DecoupledCrossAttention(ImageAttention):
    """The attn2 replacement registered on every cross-attention layer of one patched UNet. ``layers`` maps the
    host's (block, id, depth index) to the adapter layer index."""

    def __init__(self, attention: AttentionFn, layers: dict[LayerKey, int], adapters: tuple[AdapterSpec, ...],
                 uncond_chunks: Callable[[dict], tuple[bool, ...]],
                 window_frames: Callable[[dict, int], tuple[int, ...] | None] = lambda options, rows: None):
        super().__init__(adapters, len(set(layers.values())), uncond_chunks, window_frames)
        self.attention = attention
        self.layers = layers

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        heads, precision = options["n_heads"], options.get("attn_precision")
        out = self.attention(q, k, v, heads, attn_precision=precision, transformer_options=options).contiguous()
        block = options["block"]
        layer = self.layers[(block[0], block[1], options.get("block_index", 0))]
        upcast = precision is torch.float32 and q.dtype != torch.float32  # the model asks for fp32 attention
        shape = options.get("original_shape")
        self.add_image_attention(q, out, layer, heads, self.layout(options, q.shape[0]), upcast,
                                 shape and tuple(shape[-2:]), options.get("sigmas"))
        return out
