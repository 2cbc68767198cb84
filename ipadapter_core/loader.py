"""Reading IP-Adapter files safely and recognising their variant from keys and shapes.

Accepted layouts: ``.safetensors`` with flat ``image_proj.*`` / ``ip_adapter.*`` keys, and torch
pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) holding ``{"image_proj": {...}, "ip_adapter": {...}}``,
loaded weights-only so that no pickled code can run. The training prefix ``adapter_modules.`` is
read as ``ip_adapter``. XLabs' Flux files (flat ``ip_adapter_proj_model.*`` and
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` keys, either format) are read
into the same groups: ``{i}.to_k_ip.weight`` / ``.bias`` numbered by block, 0, 1, 2, ...
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .variants import BASES, DIT_BASES, VARIANTS, Variant
from .weights_file import WeightsFileError, load_weights_only

GROUPS = ("image_proj", "ip_adapter")
_ALIASES = {"adapter_modules": "ip_adapter", "ip_adapter_proj_model": "image_proj"}
_KV_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_XLABS_KV_KEY = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")


class AdapterFileError(ValueError):
    """A file that is not a usable IP-Adapter; the message names the file and what was expected."""


@dataclass(frozen=True)
class AdapterFile:
    """A validated adapter: its variant, weights and per-layer shapes."""
    name: str
    variant: Variant
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    layer_widths: tuple[int, ...]   # C of each patched attention, in key-id order (1, 3, 5, ... or 0, 1, 2, ...)

    @property
    def context_dim(self) -> int:
        return self.variant.context_dim or self.ip_adapter[f"{self.layer_ids[0]}.to_k_ip.weight"].shape[1]

    @property
    def layer_ids(self) -> range:
        """The key ids of the patched attentions, in model order: UNet processor ids 1, 3, ...; DiT blocks 0, 1, ..."""
        count = len(self.layer_widths)
        return range(count) if self.variant.base in DIT_BASES else range(1, 2 * count, 2)

    def kv_weights(self, kind: str, part: str = "weight") -> tuple[torch.Tensor, ...]:
        """Each layer's to_k_ip (``kind`` "k") or to_v_ip ("v") weight [C, D], or bias [C] (``part`` "bias");
        empty when the file has no biases (only XLabs' Flux adapters have them)."""
        found = tuple(self.ip_adapter.get(f"{i}.to_{kind}_ip.{part}") for i in self.layer_ids)
        return () if any(t is None for t in found) else found


def read_groups(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped as ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise AdapterFileError(f"{name}: no such file ({path})")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"{name}: the file is empty")
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{name}: not a readable safetensors file ({err})") from None
        groups = _grouped(flat)
    else:
        try:
            loaded = load_weights_only(str(path))
        except WeightsFileError as err:
            raise AdapterFileError(str(err)) from None
        if not isinstance(loaded, dict):
            raise AdapterFileError(f"{name}: expected a dict of tensor groups, found {type(loaded).__name__}")
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            groups = _grouped(loaded)  # flat keys, as in a safetensors file
        else:
            groups = {_ALIASES.get(k, k): v for k, v in loaded.items() if isinstance(v, dict)}
    missing = [g for g in GROUPS if not groups.get(g)]
    if missing:
        found = sorted(groups) or ["no tensor groups"]
        raise AdapterFileError(f"{name}: not an IP-Adapter file: expected the groups image_proj and ip_adapter, "
                               f"missing {', '.join(missing)} (found {', '.join(found)})")
    for group in GROUPS:
        bad = [k for k, v in groups[group].items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterFileError(f"{name}: {group}.{bad[0]} is not a tensor")
    return {g: groups[g] for g in GROUPS}


def _grouped(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat ``<group>.<key>`` tensors as groups; XLabs' per-block K/V keys become ``ip_adapter`` entries."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        xlabs = _XLABS_KV_KEY.match(key)
        if xlabs:
            groups.setdefault("ip_adapter", {})[f"{xlabs[1]}.to_{xlabs[2]}_ip.{xlabs[3]}"] = tensor
            continue
        group, _, rest = key.partition(".")
        groups.setdefault(_ALIASES.get(group, group), {})[rest] = tensor
    return groups


def _kv_layers(name: str, ip: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(D, per-layer widths C) from the to_k_ip / to_v_ip pairs, checking ids and shapes: a UNet adapter numbers
    its layers 1, 3, 5, ... (processor ids), a Flux adapter its blocks 0, 1, 2, ..."""
    pairs: dict[int, dict[str, torch.Size]] = {}
    for key, tensor in ip.items():
        match = _KV_KEY.match(key)
        if match:
            pairs.setdefault(int(match[1]), {})[match[2]] = tensor.shape
    if not pairs:
        raise AdapterFileError(f"{name}: ip_adapter holds no '<id>.to_k_ip.weight' keys")
    ids = sorted(pairs)
    if ids != list(range(len(ids))) and ids != list(range(1, 2 * len(ids), 2)):
        raise AdapterFileError(f"{name}: layer ids should be 1, 3, ..., {2 * len(ids) - 1} (UNet) or 0, 1, ..., "
                               f"{len(ids) - 1} (DiT blocks); found {ids[:8]}...")
    widths, dims = [], set()
    for i in ids:
        k, v = pairs[i].get("k"), pairs[i].get("v")
        if k is None or v is None or len(k) != 2 or k != v:
            raise AdapterFileError(f"{name}: layer {i} needs to_k_ip and to_v_ip of one 2-D shape [C, D]; "
                                   f"found {tuple(k) if k else None} and {tuple(v) if v else None}")
        widths.append(k[0])
        dims.add(k[1])
    if len(dims) != 1:
        raise AdapterFileError(f"{name}: layers disagree on the context width D: {sorted(dims)}")
    return dims.pop(), tuple(widths)


def _projection_signature(name: str, proj: dict[str, torch.Tensor]) -> tuple[str, int, int, int]:
    """(projection kind, input width E, tokens, output width) read from image_proj shapes."""
    try:
        if "time_embedding.linear_1.weight" in proj:
            return ("time_resampler", proj["proj_in.weight"].shape[1], proj["latents"].shape[1],
                    proj["proj_out.weight"].shape[0])
        if "proj.3.weight" in proj:
            return "mlp", proj["proj.0.weight"].shape[1], 257, proj["proj.2.weight"].shape[0]
        if "perceiver_resampler.proj_in.weight" in proj:
            width = proj["norm.weight"].shape[0]
            return "faceid_plus", proj["proj.0.weight"].shape[1], proj["proj.2.weight"].shape[0] // width, width
        if "latents" in proj:
            latents = proj["latents"]
            return "resampler", proj["proj_in.weight"].shape[1], latents.shape[1], proj["proj_out.weight"].shape[0]
        if "proj.0.weight" in proj and "norm.weight" in proj:
            width = proj["norm.weight"].shape[0]
            return "faceid", proj["proj.0.weight"].shape[1], proj["proj.2.weight"].shape[0] // width, width
        if "proj.weight" in proj and "norm.weight" in proj:
            width = proj["norm.weight"].shape[0]
            return "linear", proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // width, width
    except (KeyError, IndexError) as err:
        raise AdapterFileError(f"{name}: image_proj is incomplete: missing {err}") from None
    keys = ", ".join(sorted(proj)[:6])
    raise AdapterFileError(f"{name}: image_proj matches no known projection (linear, Resampler, full-face MLP, "
                           f"FaceID MLP, FaceID-Plus, time-conditioned resampler); its keys start {keys}")


def identify(name: str, groups: dict[str, dict[str, torch.Tensor]]) -> tuple[Variant, tuple[int, ...]]:
    """The variant row of an adapter, and its layer widths, from keys, shapes and the file name."""
    context_dim, widths = _kv_layers(name, groups["ip_adapter"])
    block_numbered = "0.to_k_ip.weight" in groups["ip_adapter"]
    bases = [b for b, facts in BASES.items() if facts["context_dim"] in (context_dim, None)
             and (b in DIT_BASES) == block_numbered]
    if not bases:
        known = ", ".join(f"{b} {f['context_dim'] or 'its width'}" for b, f in BASES.items())
        numbering = "blocks 0, 1, ..." if block_numbered else "layers 1, 3, ..."
        raise AdapterFileError(f"{name}: context width D={context_dim} with {numbering} belongs to no supported base "
                               f"model ({known})")
    projection, embed_dim, tokens, _ = _projection_signature(name, groups["image_proj"])
    lora = any("_lora." in k for k in groups["ip_adapter"])
    rows = [v for v in VARIANTS if v.base in bases and v.projection == projection and v.embed_dim == embed_dim
            and v.tokens == tokens and v.faceid_lora == lora]
    if not rows:
        raise AdapterFileError(f"{name}: no known IP-Adapter has this layout: base {'/'.join(bases)}, {projection} "
                               f"projection from width {embed_dim} to {tokens} tokens, FaceID LoRA {lora}")
    lowered = Path(name).name.lower()
    hinted = [v for v in rows if v.hint and v.hint in lowered]
    default = next((v for v in rows if not v.hint), rows[0])
    return (max(hinted, key=lambda v: len(v.hint)) if hinted else default), widths


def load_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read, validate and identify an IP-Adapter file."""
    name = Path(path).name
    groups = read_groups(path)
    variant, widths = identify(name, groups)
    return AdapterFile(name, variant, groups["image_proj"], groups["ip_adapter"], widths)
