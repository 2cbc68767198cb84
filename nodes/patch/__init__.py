"""Patching a cloned host model with image attention: one module per mechanism, picked by the variant table's
``patch`` column.

    hooks.py          what every mechanism reads of the host (conditioning per batch chunk, window frames, the model
                      call in progress, DiT block names) and the watch that warns when another pack dropped our hook
    layers.py         the layers an adapter patches, read from the model, and the fit (checked once per apply)
    unet.py           unet_cross_attention: attn2 replace patches (SD1.5, SDXL, Kolors)
    flux_xlabs.py     flux_double_blocks: double-stream block patches (XLabs)
    flux_instantx.py  flux_block_attention: every Flux block's attention output (InstantX)
    sd35.py           sd35_joint_blocks: joint-block patches of an MMDiT (InstantX SD3.5)

Every mechanism clones the model, keeps what other packs registered there before it (and runs it), adds to its own
earlier patch instead of stacking a second one, and names the layers it patches for the watch.
"""
from __future__ import annotations

from ...ipadapter_core.loader import AdapterFile
from .flux_instantx import patch_flux_block_attention
from .flux_xlabs import patch_flux_double_blocks
from .layers import ModelFit, model_fit
from .sd35 import TimeConditionedSpec, patch_sd35_joint_blocks
from .unet import patch_unet

MECHANISMS = {"unet_cross_attention": patch_unet, "flux_double_blocks": patch_flux_double_blocks,
              "flux_block_attention": patch_flux_block_attention, "sd35_joint_blocks": patch_sd35_joint_blocks}


def patch_model(model_patcher, adapter: AdapterFile, spec, fit: ModelFit | None = None):
    """A clone of ``model_patcher`` with ``spec`` of ``adapter`` (an ``AdapterSpec``, or a ``TimeConditionedSpec``
    for a time-conditioned resampler) added to its image attention, by the mechanism the variant table names.
    ``fit``: the adapter's on this model where the caller checked it already. A mechanism takes (model_patcher,
    spec, fit); the DiT ones read their blocks from the model and need no fit."""
    fit = fit or model_fit(model_patcher, adapter)
    return MECHANISMS[adapter.variant.patch](model_patcher, spec, fit)


__all__ = ["ModelFit", "TimeConditionedSpec", "model_fit", "patch_model"]
