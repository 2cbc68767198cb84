"""Registering decoupled cross-attention on a cloned host model, through the host's own patch mechanism
(Flux models: ``flux_patch``).

The layer list is read from the model itself (fine-tunes and distilled UNets have other depths), in
the order adapter files number their layers: input blocks, output blocks, then the middle block, which
the host keys as ("middle", 0). Which conditioning produced each batch chunk is read from the guider
once per sampling run (an OUTER_SAMPLE wrapper): chunks of its "positive" conditioning get the cond
image tokens, every other conditioning (negative, DualCFGGuider's middle, ...) the uncond tokens. When the
sampler runs the UNet on windows of the frames (the host's context windows along the batch, or
AnimateDiff-Evolved's), the window's frame indices say which image of an unfolded batch each latent gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention

from ..ipadapter_core.adapter_spec import AdapterSpec
from ..ipadapter_core.attention import DecoupledCrossAttention, LayerKey
from ..ipadapter_core.loader import AdapterFile

UNCOND_UUIDS = "image_prompt_uncond_uuids"  # key in transformer_options, set per sampling run
WRAPPER_KEY = "image_prompt_conds"


class AdapterModelMismatch(ValueError):
    """An adapter whose cross-attention layers do not fit the model's."""


@dataclass(frozen=True)
class Layer:
    key: LayerKey          # the host's (block, id, depth index) of this cross-attention, or (DiT block name, i, 0)
    width: int             # C: the attention's inner width
    context_dim: int       # D: the width of what it attends to
    transformer_index: int  # its attention block, counted in execution order (input, middle, output)
    family: str = "unet"   # "unet" | "flux" | "sd3"


DIT_BLOCK = "double_block"  # the host's name of Flux's double-stream and the MMDiT's joint blocks in DiT block patches
SINGLE_BLOCK = "single_block"  # and of Flux's single-stream blocks
FAMILIES = {"unet": ("a UNet", "cross-attention layers"), "flux": ("a Flux transformer", "double-stream blocks"),
            "sd3": ("an SD3 MMDiT", "joint blocks")}
ADAPTER_FAMILY = {"flux": "flux", "sd35": "sd3"}  # adapter bases by model family ("unet" for the others)


def cross_attention_layers(model_patcher) -> tuple[list[Layer], int]:
    """Every layer an adapter patches, in adapter-file order, and the number of attention blocks: a UNet's
    cross-attention layers (input, output, then middle blocks) over its spatial transformers; a Flux model's
    double-stream blocks (D: the width of its text input, the image tokens' width) or an MMDiT's joint blocks
    (D: its own width), each its own block. A Flux model's single-stream blocks follow its double-stream ones
    (only InstantX's adapter patches them: ``adapter_layers``)."""
    unet = model_patcher.get_model_object("diffusion_model")
    if hasattr(unet, "double_blocks"):
        context, doubles = unet.txt_in.in_features, len(unet.double_blocks)
        return [Layer((DIT_BLOCK, i, 0), block.hidden_size, context, i, "flux")
                for i, block in enumerate(unet.double_blocks)] + \
            [Layer((SINGLE_BLOCK, i, 0), block.hidden_size, context, doubles + i, "flux")
             for i, block in enumerate(unet.single_blocks)], doubles + len(unet.single_blocks)
    if hasattr(unet, "joint_blocks"):
        return [Layer((DIT_BLOCK, i, 0), unet.hidden_size, unet.hidden_size, i, "sd3")
                for i in range(len(unet.joint_blocks))], len(unet.joint_blocks)
    if not hasattr(unet, "input_blocks"):
        raise AdapterModelMismatch(f"model: IP-Adapters here patch SD1.5 and SDXL UNets, Flux transformers and SD3.5 "
                                   f"MMDiTs; this model is a {type(unet).__name__}")
    blocks = {"input": list(enumerate(unet.input_blocks)), "output": list(enumerate(unet.output_blocks)),
              "middle": [(0, unet.middle_block)] if unet.middle_block is not None else []}
    found = {}  # block name -> [(block id, depth, attn2, transformer module)]
    for name, entries in blocks.items():
        found[name] = [(block_id, depth, t.attn2, module) for block_id, block in entries for module in block.modules()
                       for depth, t in enumerate(getattr(module, "transformer_blocks", ())) if t.attn2 is not None]
    execution = [m for name in ("input", "middle", "output") for *_, m in found[name]]
    index = {id(m): i for i, m in enumerate(dict.fromkeys(execution))}
    layers = [Layer((name, block_id, depth), attn2.to_k.out_features, attn2.to_k.in_features, index[id(module)])
              for name in ("input", "output", "middle") for block_id, depth, attn2, module in found[name]]
    return layers, len(index)


def adapter_layers(adapter: AdapterFile, layers: list[Layer]) -> list[Layer]:
    """The model layers (of ``cross_attention_layers``) of the kind this adapter patches: a Flux model's
    single-stream blocks only for an adapter made for them."""
    return [layer for layer in layers if layer.key[0] != SINGLE_BLOCK or adapter.variant.single_blocks]


def check_fit(adapter: AdapterFile, layers: list[Layer]) -> None:
    """Raise AdapterModelMismatch, naming both sides, unless every adapter layer fits the model's."""
    layers = adapter_layers(adapter, layers)
    context_dims = {layer.context_dim for layer in layers}
    model_widths = tuple(layer.width for layer in layers)
    v = adapter.variant
    family, adapter_family = (layers[0].family if layers else "unet"), ADAPTER_FAMILY.get(v.base, "unet")
    fits = adapter_family == family and model_widths == adapter.layer_widths and \
        context_dims == {adapter.context_dim}
    if not fits:
        model_kind = FAMILIES[family][0]
        if family == "unet":
            model_kind = {768: "an SD1.5 UNet", 2048: "an SDXL UNet"}.get(next(iter(context_dims), 0), "another UNet")
        adapter_layer_name = "double- and single-stream blocks" if v.single_blocks else FAMILIES[adapter_family][1]
        model_layer_name = adapter_layer_name if family == adapter_family else FAMILIES[family][1]
        raise AdapterModelMismatch(
            f"{adapter.name} is a {v.base.upper()} IP-Adapter ({len(adapter.layer_widths)} "
            f"{adapter_layer_name}, context width {adapter.context_dim}) but the model is "
            f"{model_kind} ({len(layers)} {model_layer_name}, context width "
            f"{'/'.join(map(str, sorted(context_dims)))}): load an adapter made for this model")


def uncond_chunks(options: dict) -> tuple[bool, ...]:
    """Per batch chunk: does it come from a non-positive conditioning? Falls back to the host's CFG
    convention (cond_or_uncond 1 = negative) when the model runs outside a guider."""
    uncond = options.get(UNCOND_UUIDS)
    if uncond is not None and "uuids" in options:
        return tuple(u in uncond for u in options["uuids"])
    return tuple(c == 1 for c in options["cond_or_uncond"])


def window_frames(options: dict, rows: int) -> tuple[int, ...] | None:
    """The frame index of each latent in a batch chunk of ``rows`` latents when the UNet runs on a window of the
    frames: the host's context window along the batch (the frames its own ``get_tensor`` slices: ``index_list``, after
    the anchor frame that newer hosts' ``causal_window_fix`` puts first) or AnimateDiff-Evolved's
    (``ad_params["sub_idxs"]``). None when there is no window, or one of another length (a window left in the
    options from an earlier call)."""
    window = options.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0:
        index_list = getattr(window, "index_list", None)
        frames = window.get_tensor(torch.arange(max(index_list) + 1)).tolist() if index_list else None
    else:
        frames = (options.get("ad_params") or {}).get("sub_idxs")
    if frames is None or len(frames) != rows:
        return None
    return tuple(int(f) for f in frames)


def _tag_uncond_conds(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: record which conditionings (by uuid) are not the guider's positive."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    options[UNCOND_UUIDS] = frozenset(c["uuid"] for key, conds in guider.conds.items() if key != "positive"
                                      for c in (conds or ()) if "uuid" in c)
    return executor(*args, **kwargs)


def tag_uncond_conds(patched) -> None:
    """Have the guider record its non-positive conditionings on ``patched`` (once per model)."""
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _tag_uncond_conds)


def patch_model(model_patcher, adapter: AdapterFile, spec: AdapterSpec):
    """A clone of ``model_patcher`` with ``spec`` added to its image attention (the input is untouched)."""
    layers, _ = cross_attention_layers(model_patcher)
    check_fit(adapter, layers)
    if layers[0].family == "flux" and adapter.variant.single_blocks:
        from .flux_instantx_patch import patch_flux_instantx
        return patch_flux_instantx(model_patcher, spec)
    if layers[0].family == "flux":
        from .flux_patch import patch_flux
        return patch_flux(model_patcher, spec)
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    previous = replaces.get(layers[0].key)
    adapters = (previous.adapters if isinstance(previous, DecoupledCrossAttention) else ()) + (spec,)
    patch = DecoupledCrossAttention(optimized_attention, {layer.key: i for i, layer in enumerate(layers)},
                                    adapters, uncond_chunks, window_frames)
    for layer in layers:
        patched.set_model_attn2_replace(patch, *layer.key)
    tag_uncond_conds(patched)
    return patched
