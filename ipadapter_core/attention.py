"""Decoupled cross-attention (IP-Adapter, arXiv 2308.06721, eq. 5), as one replacement per cross-attention layer.

    Z = Attn(Q, K_text, V_text) + sum_a w_a[layer] * Attn(Q, K_a, V_a),   K_a = c_a W'_k,a,  V_a = c_a W'_v,a

Q, K_text and V_text arrive already projected by the frozen layer ([B, N, C] and [B, 77, C]); the result goes
to the layer's own ``to_out``. The image keys and values of each adapter are computed once per layer, device
and dtype and then reused at every step. Which image tokens a batch chunk gets (cond or uncond) is decided
by the conditioning that produced the chunk, never by its position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# attention(q [B, N, C], k [B, M, C], v [B, M, C], heads, **options) -> [B, N, C]
AttentionFn = Callable[..., torch.Tensor]
LayerKey = tuple[str, int, int]  # (block name, block id, depth index in its transformer)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter on one model: image tokens, per-layer K/V weights and per-layer weights.

    ``cond_tokens`` / ``uncond_tokens`` are [1, T, D]; ``to_k[i]`` / ``to_v[i]`` are [C_i, D] for layer i;
    ``layer_weights[i]`` is the scale of the image term at layer i (0 skips the layer)."""
    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    to_k: tuple[torch.Tensor, ...]
    to_v: tuple[torch.Tensor, ...]
    layer_weights: tuple[float, ...]
    _kv_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def image_kv(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of [uncond; cond] tokens at ``layer``: two tensors [2, T, C], computed once."""
        key = (layer, device, dtype)
        if key not in self._kv_cache:
            tokens = torch.cat([self.uncond_tokens, self.cond_tokens]).to(device, dtype)
            self._kv_cache[key] = (tokens @ self.to_k[layer].to(device, dtype).T,
                                   tokens @ self.to_v[layer].to(device, dtype).T)
        return self._kv_cache[key]


class DecoupledCrossAttention:
    """The attn2 replacement registered on every cross-attention layer of one patched model.

    ``layers`` maps the host's (block, id, depth index) to the adapter layer index. ``uncond_chunks(options)``
    returns, per batch chunk, whether the chunk belongs to an unconditional (negative-side) conditioning."""

    def __init__(self, attention: AttentionFn, layers: dict[LayerKey, int], adapters: tuple[AdapterSpec, ...],
                 uncond_chunks: Callable[[dict], tuple[bool, ...]]):
        self.attention = attention
        self.layers = layers
        self.adapters = adapters
        self.uncond_chunks = uncond_chunks
        self._batched: dict = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        heads = options["n_heads"]
        out = self.attention(q, k, v, heads, attn_precision=options.get("attn_precision"), transformer_options=options)
        block = options["block"]
        layer = self.layers[(block[0], block[1], options.get("block_index", 0))]
        flags = self.uncond_chunks(options)
        for index, adapter in enumerate(self.adapters):
            weight = adapter.layer_weights[layer]
            if weight == 0:
                continue
            k_ip, v_ip = self._batched_kv(index, adapter, layer, flags, q.shape[0] // len(flags), q.device, q.dtype)
            out = out + weight * self.attention(q, k_ip, v_ip, heads, attn_precision=options.get("attn_precision"))
        return out

    def _batched_kv(self, index, adapter, layer, flags, rows, device, dtype):
        """Image K/V laid out like the batch ([B, T, C]): uncond chunks get the uncond tokens, the rest cond."""
        key = (index, layer, flags, rows, device, dtype)
        if key not in self._batched:
            k_pair, v_pair = adapter.image_kv(layer, device, dtype)
            pick = torch.tensor([0 if uncond else 1 for uncond in flags for _ in range(rows)], device=device)
            self._batched[key] = (k_pair.index_select(0, pick), v_pair.index_select(0, pick))
        return self._batched[key]

    def __deepcopy__(self, memo):
        """The host deep-copies model options on every clone; this object is never mutated, so share it."""
        return self

    def to(self, *args, **kwargs):
        """The host moves patches with the model; K/V are cached per device and dtype, so nothing moves here."""
        return self
