"""The layers an adapter patches, read from the model itself, and whether an adapter fits them: checked once per
apply (``model_fit``) and handed to the weights and the patch.

A UNet's layers come in the order adapter files number them: input blocks, output blocks, then the middle block
(which the host keys as ("middle", 0)); fine-tunes and distilled UNets have other depths. DiT models number theirs by
block: Flux's double-stream blocks (then its single-stream ones), an MMDiT's joint blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...ipadapter_core.attention import LayerKey
from ...ipadapter_core.loader import AdapterFile
from .hooks import DIT_BLOCK, SINGLE_BLOCK


class AdapterModelMismatch(ValueError):
    """An adapter whose cross-attention layers do not fit the model's."""


@dataclass(frozen=True)
class Layer:
    key: LayerKey          # the host's (block, id, depth index) of this cross-attention, or (DiT block name, i, 0)
    width: int             # C: the attention's inner width
    context_dim: int       # D: the width of what it attends to
    transformer_index: int  # its attention block, counted in execution order (input, middle, output)
    family: str = "unet"   # "unet" | "flux" | "sd3"


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


@dataclass(frozen=True)
class ModelFit:
    """An adapter on a model, checked: the model's layers of the kind the adapter patches (``adapter_layers``),
    and the number of attention blocks they sit in."""
    adapter: AdapterFile
    layers: tuple[Layer, ...]

    @property
    def blocks(self) -> int:
        return len({layer.transformer_index for layer in self.layers})


def model_fit(model_patcher, adapter: AdapterFile) -> ModelFit:
    """The fit of ``adapter`` on ``model_patcher``'s model; AdapterModelMismatch when it does not fit."""
    layers, _ = cross_attention_layers(model_patcher)
    check_fit(adapter, layers)
    return ModelFit(adapter, tuple(adapter_layers(adapter, layers)))
