"""Image prompts on SD1.5/SDXL UNets: decoupled cross-attention as the host's attn2 replace patch of every
cross-attention layer (the math: ``ipadapter_core.attention``).

Chunks of the guider's positive conditioning get the cond image tokens, every other conditioning the uncond tokens
(``hooks.uncond_chunks``); under context windows each latent gets its frame's image (``hooks.window_frames``). An
attn2 replace patch another pack set on a layer before ours runs as that layer's text attention, so both act.
"""
from __future__ import annotations

from comfy.ldm.modules.attention import optimized_attention

from ...ipadapter_core.adapter_spec import AdapterSpec
from ...ipadapter_core.attention import DecoupledCrossAttention, LayerKey
from .hooks import CallCount, tag_uncond_conds, uncond_chunks, watch, window_frames
from .layers import ModelFit

LAYER_KIND = "cross-attention layers (attn2)"


class TextAttention(CallCount):
    """The text attention of every patched layer (q, k, v [B, N, C] already projected -> [B, N, C]): the attn2
    replace patch another pack set on the layer before ours, called as the host calls it, else the host's
    attention. Counts its calls for ``hooks.watch``."""

    def __init__(self, before: dict[LayerKey, object]):
        super().__init__()
        self.before = before

    def __call__(self, q, k, v, heads: int, attn_precision=None, transformer_options=None):
        self.ran()
        options = transformer_options
        inner = self.before.get((*options["block"], options.get("block_index", 0))) if self.before else None
        if inner is not None:
            return inner(q, k, v, options)
        return optimized_attention(q, k, v, heads, attn_precision=attn_precision, transformer_options=options)


def patch_unet(model_patcher, spec: AdapterSpec, fit: ModelFit):
    """A clone of ``model_patcher`` (a UNet) with ``spec`` added to its cross-attention layers."""
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    keys = [layer.key for layer in fit.layers]
    earlier = replaces.get(keys[0])
    if isinstance(earlier, DecoupledCrossAttention):
        adapters, text = earlier.adapters + (spec,), earlier.attention
    else:
        adapters, text = (spec,), TextAttention({key: replaces[key] for key in keys if key in replaces})
    patch = DecoupledCrossAttention(text, {key: i for i, key in enumerate(keys)}, adapters, uncond_chunks,
                                    window_frames)
    for key in keys:
        patched.set_model_attn2_replace(patch, *key)
    tag_uncond_conds(patched)
    watch(patched, LAYER_KIND, text)
    return patched
