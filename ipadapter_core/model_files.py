"""Model files recognised by what they hold, whatever they are called: IP-Adapters by their keys and shapes (the
variant table's rows), CLIP vision encoders by their widths and positions.

A safetensors file is read as its header only (the shapes, and whether the file is as long as the header says); a
torch pickle is read weights-only, once. Each result is remembered by path, size and modification time.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace

import torch

from .loader import GROUPS, AdapterFile, AdapterFileError, _grouped, identify, read_groups
from .siglip_pooling import HEAD_PREFIX
from .presets import PUBLISHED, plain
from .variants import ENCODERS, Variant, layout_mates
from .weights_file import load_weights_only

SAFETENSORS = (".safetensors", ".sft")
# The folders (under models/) the host lists IP-Adapters from: ours, XLabs' nodes' and Shakker-Labs' (InstantX's Flux).
ADAPTER_FOLDERS = ("ipadapter", "xlabs/ipadapters", "ipadapter-flux")
BASE_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "kolors": "Kolors", "flux": "FLUX.1", "sd35": "SD3.5"}
MAX_HEADER = 100 << 20  # safetensors' own limit on a header's length


@dataclass(frozen=True)
class Found:
    """What one file is: an IP-Adapter (``adapter``, its tensors on the meta device: shapes only), a CLIP vision
    encoder (``encoder``, a key of ENCODERS, or "" for a vision model the table does not know, then ``error`` says
    its widths), or neither (``error`` says why)."""
    path: str
    adapter: AdapterFile | None = None
    encoder: str | None = None
    pooling_head: bool = False  # SigLIP: the file keeps its attention-pooling head
    error: str = ""


_SEEN: dict[tuple[str, str], tuple[tuple[int, int], Found]] = {}  # (path, kind) -> ((size, mtime), what it is)


def recognise(path: str, kind: str) -> Found:
    """What the file at ``path`` is, read as ``kind`` ("ipadapter" or "clip_vision"), remembered while its size and
    modification time stay."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    stamp = (stat.st_size, stat.st_mtime_ns)
    seen = _SEEN.get((path, kind))
    if seen is None or seen[0] != stamp:
        seen = _SEEN[(path, kind)] = (stamp, _read(path, kind))
    return seen[1]


def _read(path: str, kind: str) -> Found:
    name = os.path.basename(path)
    try:
        if path.lower().endswith(SAFETENSORS):
            shapes = header_shapes(path)
            groups = _grouped({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
            if kind == "clip_vision" or any(not groups.get(group) for group in GROUPS):
                return _as_encoder(path, shapes, kind)
        elif kind == "clip_vision":
            loaded = load_weights_only(path, mmap=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"{name}: expected a dict of tensors, found {type(loaded).__name__}")
            return _as_encoder(path, {k: tuple(v.shape) for k, v in loaded.items() if isinstance(v, torch.Tensor)}, kind)
        else:
            groups = read_groups(path)
        variant, widths = identify(name, groups)
        meta = {group: {k: torch.empty(v.shape, device="meta") for k, v in groups[group].items()} for group in GROUPS}
        return Found(path, adapter=AdapterFile(name, variant, meta["image_proj"], meta["ip_adapter"], widths))
    except Exception as err:  # noqa: BLE001 - any unreadable or foreign file is reported, never raised
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        return Found(path, error=text.removeprefix(f"{name}: "))


def header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a safetensors file from its header; ValueError where the file is not one, or is shorter
    or longer than the header says (a truncated download)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER):
            raise ValueError("not a safetensors file (no header)")
        try:
            header = json.loads(f.read(length))
            entries = {k: e for k, e in header.items() if k != "__metadata__"}
            end = max((e["data_offsets"][1] for e in entries.values()), default=0)
            shapes = {k: tuple(e["shape"]) for k, e in entries.items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError("not a safetensors file (unreadable header)") from None
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "longer than its header says"
        raise ValueError(f"{state}: its header describes {8 + length + end} bytes, the file has {size}")
    return shapes


def _as_encoder(path: str, shapes: dict[str, tuple[int, ...]], kind: str) -> Found:
    """A CLIP vision file in the host's layout (transformers' names) or open_clip's (``visual.*``)."""
    if "visual.conv1.weight" in shapes:
        patch, positions = shapes["visual.conv1.weight"], shapes.get("visual.positional_embedding")
        projection = shapes["visual.proj"][1] if "visual.proj" in shapes else None
    else:
        patch = shapes.get("vision_model.embeddings.patch_embedding.weight")
        positions = shapes.get("vision_model.embeddings.position_embedding.weight")
        projection = shapes["visual_projection.weight"][0] if "visual_projection.weight" in shapes else None
    if patch is None or positions is None:
        what = "an IP-Adapter" if kind == "ipadapter" else "a CLIP vision model"
        return Found(path, error=f"not {what} (its keys start {', '.join(sorted(shapes)[:3]) or 'nowhere: none'})")
    hidden, grid = patch[0], math.isqrt(positions[0])
    encoder = next((name for name, e in ENCODERS.items() if (e["hidden"], e["projection"]) == (hidden, projection)
                    and e["image_size"] // patch[-1] == grid), "")
    head = any(key.startswith(HEAD_PREFIX) for key in shapes)
    error = "" if encoder else f"a vision model of hidden width {hidden}, projection {projection}, {positions[0]} positions"
    if kind == "ipadapter":
        error = f"the CLIP vision {encoder or 'of ' + error}, not an IP-Adapter (it belongs in clip_vision)"
        return Found(path, error=error)
    return Found(path, encoder=encoder, pooling_head=head, error=error)


def short(variant: Variant) -> str:
    """A variant's name without its base: "plus-face"."""
    return variant.name.rsplit("_", 1)[0]


def named_row(found: Found) -> Variant | None:
    """The row of the adapter's layout that its file name names: by the row's hint (as the loader reads names), else
    by holding the row's public file name (compared by ``plain``; the longest wins); None where it names none."""
    variant = found.adapter.variant
    if variant.hint:
        return variant
    stem = plain(found.adapter.name)
    named = [m for m in layout_mates(variant) if plain(PUBLISHED[m.name].file) in stem]
    return max(named, key=lambda m: len(PUBLISHED[m.name].file), default=None)


def may_be(found: Found, wanted: Variant) -> bool:
    """Whether the file may be ``wanted``: it has that row's layout, and its name names no other row of it."""
    return found.adapter is not None and wanted in layout_mates(found.adapter.variant) and \
        named_row(found) in (None, wanted)


def choose_adapter(files: list[tuple[str, Found]], wanted: Variant, fits) -> tuple[Found | None, list[str]]:
    """The file (of ``files``: listed name and what it is) that is ``wanted`` and ``fits(AdapterFile)`` the model, and
    "name: what it is" for every file. Ties go first to the files whose name names ``wanted`` (``named_row``), then
    by listed name."""
    chosen, seen = [], []
    for name, found in files:
        what = describe(found)
        if may_be(found, wanted):
            if fits(replace(found.adapter, variant=wanted)):
                chosen.append(((named_row(found) != wanted, name.lower()), found))
            else:
                what += f" ({len(found.adapter.layer_widths)} layers: made for another model than this one)"
        seen.append(f"{name}: {what}")
    return (min(chosen, key=lambda c: c[0])[1] if chosen else None), seen


def choose_encoder(files: list[tuple[str, Found]], encoder: str, pooled: bool) -> tuple[Found | None, list[str]]:
    """The file that holds ``encoder``, and "name: what it is" for every file. Ties go first (for a pooled output,
    InstantX's Flux adapter) to the files with SigLIP's pooling head, then to those named as the encoder's public file
    (``plain``), then by listed name."""
    chosen = [((pooled and not found.pooling_head, plain(ENCODERS[encoder]["file"]) != plain(name), name.lower()),
               found) for name, found in files if found.encoder == encoder]
    return (min(chosen, key=lambda c: c[0])[1] if chosen else None), [f"{name}: {describe(f)}" for name, f in files]


def needs(variant: Variant) -> str:
    """What an adapter reads: "ViT-H-14", "a face embedding and ViT-H-14 (and its LoRA)"."""
    if variant.encoder in ENCODERS:
        return variant.encoder
    clip = f" and {variant.clip_encoder}" if variant.clip_encoder else ""
    return f"a face embedding{clip}" + (" (and its LoRA)" if variant.faceid_lora else "")


def describe(found: Found) -> str:
    """What a file is, in a few words: "plus, SDXL, needs ViT-H-14"; "CLIP vision ViT-bigG-14"; "truncated: ..."."""
    if found.adapter is not None:
        variant, mates = found.adapter.variant, layout_mates(found.adapter.variant)
        what = short(variant) if named_row(found) or len(mates) == 1 else \
            f"{' or '.join(map(short, mates))} (same weights' shapes; its name names none)"
        return f"{what}, {BASE_NAMES[variant.base]}, needs {needs(variant)}"
    if found.encoder:
        return f"CLIP vision {found.encoder}" + (" with its pooling head" if found.pooling_head else "")
    return found.error
