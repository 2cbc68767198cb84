"""From image tokens and apply options to a patched model: the adapter spec, decided once per apply."""
from __future__ import annotations

import torch

from ..ipadapter_core.adapter_spec import AdapterSpec
from ..ipadapter_core.apply_options import ApplyOptions
from ..ipadapter_core.weights import explicit_layer_weights, layer_weights
from .ipadapter_encode import LoadedAdapter, encode_reference
from .ipadapter_patch import check_fit, cross_attention_layers, patch_model


def adapter_spec(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor,
                 options: ApplyOptions) -> AdapterSpec:
    """Everything the patch needs, decided once: per-layer weights, K/V weights, sigma range, mask."""
    if options.image_weights and cond.shape[0] == 1:  # one image, a weight per latent
        count = len(options.image_weights)
        cond, uncond = cond.expand(count, -1, -1), uncond.expand(count, -1, -1)
    layers, blocks = cross_attention_layers(model)
    check_fit(adapter.file, layers)
    indices = [(layer.key[0], layer.transformer_index) for layer in layers]
    if options.layer_weights.strip():
        weights = explicit_layer_weights(options.layer_weights, options.weight, indices, blocks)
    else:
        weights = layer_weights(options.weight_type, options.weight, indices, blocks, options.composition_weight)
    sigma_range = None
    if (options.start_at, options.end_at) != (0.0, 1.0):
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(options.start_at)),
                       float(sampling.percent_to_sigma(options.end_at)))
    file = adapter.file
    ids = range(1, 2 * len(file.layer_widths), 2)
    return AdapterSpec(cond, uncond, tuple(file.ip_adapter[f"{i}.to_k_ip.weight"] for i in ids),
                       tuple(file.ip_adapter[f"{i}.to_v_ip.weight"] for i in ids), weights.weights,
                       weights.swapped, options.embeds_scaling, sigma_range, options.attn_mask, options.image_weights)


def apply_tokens(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, options: ApplyOptions):
    """A patched clone of ``model`` with these image tokens."""
    return patch_model(model, adapter.file, adapter_spec(model, adapter, cond, uncond, options))


def apply_adapter(model, adapter: LoadedAdapter, clip_vision, image: torch.Tensor, options: ApplyOptions):
    """What the image apply nodes do: check the fit first (cheaper than encoding, and the deeper
    mismatch), encode the reference, and patch a clone."""
    check_fit(adapter.file, cross_attention_layers(model)[0])
    cond, uncond = encode_reference(adapter, clip_vision, image, options)
    return apply_tokens(model, adapter, cond, uncond, options)
