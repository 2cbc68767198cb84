"""From image tokens (or, for a time-conditioned resampler, embeds) and apply options to a patched model: the
adapter spec, decided once per apply."""
from __future__ import annotations

import torch

from ..ipadapter_core.adapter_spec import AdapterSpec
from ..ipadapter_core.apply_options import ApplyOptions
from ..ipadapter_core.embeds import combine_embeds
from ..ipadapter_core.weights import LayerWeights, explicit_layer_weights, layer_weights
from .ipadapter_encode import LoadedAdapter, image_tokens, paired_embeds, reference_embeds
from .patch import ModelFit, TimeConditionedSpec, model_fit, patch_model


def weights_and_range(model, fit: ModelFit, options: ApplyOptions) -> tuple[LayerWeights, tuple | None]:
    """The per-layer weights (weight type or written per-block weights) and the sigma range (high, low) or None."""
    indices = [(layer.key[0], layer.transformer_index) for layer in fit.layers]
    if options.layer_weights.strip():
        weights = explicit_layer_weights(options.layer_weights, options.weight, indices, fit.blocks)
    else:
        weights = layer_weights(options.weight_type, options.weight, indices, fit.blocks, options.composition_weight)
    sigma_range = None
    if (options.start_at, options.end_at) != (0.0, 1.0):
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(options.start_at)),
                       float(sampling.percent_to_sigma(options.end_at)))
    return weights, sigma_range


def per_latent(cond: torch.Tensor, uncond: torch.Tensor, options: ApplyOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens or embeds [n, ...] as many times as there are image weights when there is one image (a weight per
    latent); else unchanged."""
    if options.image_weights and cond.shape[0] == 1:
        count = len(options.image_weights)
        return cond.expand(count, *cond.shape[1:]), uncond.expand(count, *uncond.shape[1:])
    return cond, uncond


def adapter_spec(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, options: ApplyOptions,
                 fit: ModelFit | None = None) -> AdapterSpec:
    """Everything the patch needs, decided once: per-layer weights, K/V weights, sigma range, mask."""
    cond, uncond = per_latent(cond, uncond, options)
    weights, sigma_range = weights_and_range(model, fit or model_fit(model, adapter.file), options)
    file = adapter.file
    return AdapterSpec(cond, uncond, file.kv_weights("k"), file.kv_weights("v"), weights.weights,
                       weights.swapped, options.embeds_scaling, sigma_range, options.attn_mask, options.image_weights,
                       file.kv_weights("k", "bias"), file.kv_weights("v", "bias"), file.variant.k_norm_head_dim)


def apply_tokens(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, options: ApplyOptions,
                 fit: ModelFit | None = None):
    """A patched clone of ``model`` with these image tokens (``fit``: the adapter's, where already checked)."""
    fit = fit or model_fit(model, adapter.file)
    return patch_model(model, adapter.file, adapter_spec(model, adapter, cond, uncond, options, fit), fit)


def time_conditioned_spec(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor,
                          options: ApplyOptions, fit: ModelFit) -> TimeConditionedSpec:
    """The SD3.5 adapter's spec from hidden-state embeds [n, N, E] (combined as ``options`` say, or one per latent
    with ``unfold_batch``): what the patch runs the resampler on at each step, with the file's per-block weights."""
    if options.embeds_scaling != "V only":  # its image K/V share one softmax with the block's own
        raise ValueError(f"embeds_scaling: {adapter.file.name} ({adapter.file.variant.name}) takes 'V only' (its "
                         f"image keys share the joint attention's softmax); got {options.embeds_scaling!r}")
    weights, sigma_range = weights_and_range(model, fit, options)
    cond, uncond = paired_embeds(adapter, cond, uncond)
    if not options.unfold_batch:
        cond, uncond = (combine_embeds(e, options.combine_embeds).reshape(1, -1, e.shape[-1]) for e in (cond, uncond))
    cond, uncond = per_latent(cond, uncond, options)
    blocks = tuple({k.split(".", 1)[1]: v for k, v in adapter.file.ip_adapter.items() if k.split(".", 1)[0] == str(i)}
                   for i in adapter.file.layer_ids)
    return TimeConditionedSpec(cond.float().cpu(), uncond.float().cpu(), adapter.projection, blocks, weights.weights,
                               sigma_range, options.attn_mask, options.image_weights)


def apply_embeds(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, options: ApplyOptions,
                 fit: ModelFit | None = None):
    """A patched clone of ``model`` from CLIP embeds: projected now, or at each step by a time-conditioned
    resampler (SD3.5). ``fit``: the adapter's on ``model``, where already checked."""
    fit = fit or model_fit(model, adapter.file)
    if adapter.file.variant.projection == "time_resampler":
        return patch_model(model, adapter.file, time_conditioned_spec(model, adapter, cond, uncond, options, fit), fit)
    cond, uncond = image_tokens(adapter, cond, uncond, options.combine_embeds, options.unfold_batch)
    return apply_tokens(model, adapter, cond, uncond, options, fit)


def apply_adapter(model, adapter: LoadedAdapter, clip_vision, image: torch.Tensor, options: ApplyOptions,
                  fit: ModelFit | None = None):
    """What the image apply nodes do: check the fit first (cheaper than encoding, and the deeper mismatch) unless
    the caller did (``fit``, for several applies on one model), encode the reference, and patch a clone."""
    fit = fit or model_fit(model, adapter.file)
    cond, uncond = reference_embeds(adapter, clip_vision, image, options.image_negative, options.enhance)
    return apply_embeds(model, adapter, cond, uncond, options, fit)
