"""Weight types: the image-attention weight of each cross-attention layer, over the host's transformer index.

The transformer index t counts the UNet's attention blocks in execution order (input, middle, output):
16 in SD1.5 (middle = 6), 11 in SDXL (middle = 4, the InstantStyle "layout" block is 3 and the "style"
block 6). Curves work on any UNet; the block maps (style / composition) need the SD1.5 or SDXL layout.
The two "precise" types also swap the image and the unconditional tokens on some layers, so that
classifier-free guidance pushes away from the reference there.
"""
from __future__ import annotations

from dataclasses import dataclass

from .choices import check_choice

CURVES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out",
          "weak input", "weak output", "weak middle", "strong middle")
BLOCK_MAPS = ("style transfer", "composition", "strong style transfer", "style and composition",
              "strong style and composition", "style transfer precise", "composition precise")
WEIGHT_TYPES = CURVES + BLOCK_MAPS
FLOOR, DAMPING = 0.05, 0.2

# Attention blocks (transformer index) of the two layouts the block maps are defined on.
LAYOUT_BLOCKS = {16: "sd15", 11: "sdxl"}


def _w(blocks, share=1.0):
    return {t: ("weight", share) for t in blocks}


def _c(blocks, share=1.0):
    return {t: ("composition", share) for t in blocks}


_SD15_STYLE = (0, 1, 2, 3, *range(9, 16))
_STYLE_AND_COMPOSITION = {"sd15": {**_w(_SD15_STYLE), **_c([4], 0.25), **_c([5])}, "sdxl": {**_c([3]), **_w([6])}}
# (type, layout) -> transformer index -> (which weight, share of it); blocks not listed get 0.
BLOCK_WEIGHTS = {
    ("style transfer", "sd15"): _w(_SD15_STYLE),
    ("style transfer", "sdxl"): _w([6]),
    ("composition", "sd15"): {**_w([4], 0.25), **_w([5])},
    ("composition", "sdxl"): _w([3]),
    ("strong style transfer", "sd15"): _w([0, 1, 2, 3, *range(6, 16)]),
    ("strong style transfer", "sdxl"): _w([0, 1, 2, *range(4, 11)]),
    ("style and composition", "sd15"): _STYLE_AND_COMPOSITION["sd15"],
    ("style and composition", "sdxl"): _STYLE_AND_COMPOSITION["sdxl"],
    ("strong style and composition", "sd15"): {**_w(range(16)), **_c([4, 5])},
    ("strong style and composition", "sdxl"): {**_w(range(11)), **_c([3])},
    ("style transfer precise", "sd15"): _STYLE_AND_COMPOSITION["sd15"],
    ("style transfer precise", "sdxl"): _STYLE_AND_COMPOSITION["sdxl"],
    ("composition precise", "sd15"): {**_w(range(16)), **_w([6, 7, 8], 0.1), **_c([4], 0.25), **_c([5])},
    ("composition precise", "sdxl"): {**_w(range(11), 0.1), **_w([6]), **_c([3])},
}
# Blocks where the precise types give the image to the uncond side and zeros to the cond side.
SWAPPED_BLOCKS = {
    ("style transfer precise", "sd15"): {4, 5},
    ("style transfer precise", "sdxl"): {3},
    ("composition precise", "sd15"): set(range(16)) - {4, 5},
    ("composition precise", "sdxl"): set(range(11)) - {3},
}


@dataclass(frozen=True)
class LayerWeights:
    weights: tuple[float, ...]  # per cross-attention layer
    swapped: tuple[bool, ...]   # per layer: image tokens go to the uncond side, zeros to the cond side


def _curve(kind: str, weight: float, block: str, t: int, blocks: int) -> float:
    half = blocks / 2
    if kind == "ease in":
        return weight * (FLOOR + (1 - FLOOR) * (1 - t / blocks))
    if kind == "ease out":
        return weight * (FLOOR + (1 - FLOOR) * t / blocks)
    if kind == "ease in-out":
        return weight * (FLOOR + (1 - FLOOR) * (1 - abs(t - half) / half))
    if kind == "reverse in-out":
        return weight * (FLOOR + (1 - FLOOR) * abs(t - half) / half)
    weak = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",),
            "strong middle": ("input", "output")}.get(kind, ())
    return weight * DAMPING if block in weak else weight


def check_weight_type(kind: str) -> None:
    check_choice("weight_type", kind, WEIGHT_TYPES)


def layer_weights(kind: str, weight: float, layers: list[tuple[str, int]], blocks: int,
                  composition: float | None = None) -> LayerWeights:
    """Weights for ``layers`` ((block name, transformer index) per cross-attention layer) of a UNet with
    ``blocks`` attention blocks. ``composition`` is the weight of the layout blocks (default ``weight``)."""
    check_weight_type(kind)
    if kind in CURVES:
        return LayerWeights(tuple(_curve(kind, weight, b, t, blocks) for b, t in layers), (False,) * len(layers))
    layout = LAYOUT_BLOCKS.get(blocks)
    if layout is None:
        raise ValueError(f"weight_type: '{kind}' addresses the attention blocks of SD1.5 (16) or SDXL (11); "
                         f"this model has {blocks}: use a curve such as 'linear' or 'ease out'")
    values = {"weight": weight, "composition": weight if composition is None else composition}
    per_block = {t: values[which] * share for t, (which, share) in BLOCK_WEIGHTS[(kind, layout)].items()}
    swapped = SWAPPED_BLOCKS.get((kind, layout), set())
    return LayerWeights(tuple(per_block.get(t, 0.0) for _, t in layers), tuple(t in swapped for _, t in layers))


def parse_block_weights(text: str, blocks: int) -> dict[int, float]:
    """"index:weight, ..." (attention block index -> weight, in any order) -> {index: weight}."""
    values = {}
    for entry in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        index, sep, value = entry.partition(":")
        try:
            t, w = int(index), float(value)
        except ValueError:
            t = w = None
        if not sep or t is None or not 0 <= t < blocks or w != w:
            raise ValueError(f"layer_weights: '{entry}' is not 'index:weight' with an attention block index "
                             f"0..{blocks - 1} (this model has {blocks} attention blocks)")
        values[t] = w
    return values


def explicit_layer_weights(text: str, weight: float, layers: list[tuple[str, int]], blocks: int) -> LayerWeights:
    """Per-block weights written out ("3:1, 6:0.5"): block t gets weight x its value, unlisted blocks 0."""
    values = parse_block_weights(text, blocks)
    return LayerWeights(tuple(weight * values.get(t, 0.0) for _, t in layers), (False,) * len(layers))
