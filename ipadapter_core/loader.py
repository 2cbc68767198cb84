"""Reading IP-Adapter files safely and recognising their variant from keys and shapes.

Accepted layouts: ``.safetensors`` with flat ``image_proj.*`` / ``ip_adapter.*`` keys, and torch
pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) holding ``{"image_proj": {...}, "ip_adapter": {...}}``,
loaded weights-only so that no pickled code can run. The training prefix ``adapter_modules.`` is
read as ``ip_adapter``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .variants import BASES, VARIANTS, Variant

GROUPS = ("image_proj", "ip_adapter")
_ALIASES = {"adapter_modules": "ip_adapter"}
_KV_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


class AdapterFileError(ValueError):
    """A file that is not a usable IP-Adapter; the message names the file and what was expected."""


@dataclass(frozen=True)
class AdapterFile:
    """A validated adapter: its variant, weights and per-layer shapes."""
    name: str
    variant: Variant
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    layer_widths: tuple[int, ...]   # C of each cross-attention layer, in key-id order (1, 3, 5, ...)

    @property
    def context_dim(self) -> int:
        return self.variant.context_dim


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
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            group, _, rest = key.partition(".")
            groups.setdefault(_ALIASES.get(group, group), {})[rest] = tensor
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights-only unpickling refuses code; a damaged file fails here too
            raise AdapterFileError(f"{name}: not a readable weights-only torch file "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        if not isinstance(loaded, dict):
            raise AdapterFileError(f"{name}: expected a dict of tensor groups, found {type(loaded).__name__}")
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


def _kv_layers(name: str, ip: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(D, per-layer widths C) from the to_k_ip / to_v_ip pairs, checking ids and shapes."""
    pairs: dict[int, dict[str, torch.Size]] = {}
    for key, tensor in ip.items():
        match = _KV_KEY.match(key)
        if match:
            pairs.setdefault(int(match[1]), {})[match[2]] = tensor.shape
    if not pairs:
        raise AdapterFileError(f"{name}: ip_adapter holds no '<id>.to_k_ip.weight' keys")
    ids = sorted(pairs)
    expected_ids = list(range(1, 2 * len(ids), 2))
    if ids != expected_ids:
        raise AdapterFileError(f"{name}: cross-attention ids should be 1, 3, ..., {expected_ids[-1]}; found {ids[:8]}...")
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
                           f"FaceID MLP, FaceID-Plus); its keys start {keys}")


def identify(name: str, groups: dict[str, dict[str, torch.Tensor]]) -> tuple[Variant, tuple[int, ...]]:
    """The variant row of an adapter, and its layer widths, from keys, shapes and the file name."""
    context_dim, widths = _kv_layers(name, groups["ip_adapter"])
    bases = [b for b, facts in BASES.items() if facts["context_dim"] == context_dim]
    if not bases:
        known = ", ".join(f"{b} {f['context_dim']}" for b, f in BASES.items())
        raise AdapterFileError(f"{name}: context width D={context_dim} belongs to no supported base model ({known})")
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
