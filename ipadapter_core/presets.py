"""The unified loaders' presets and the public files, as one table keyed like the variant table.

Each variant has a row: the name it is published under (what an error asks for), the repository that publishes it,
and the preset of a unified loader that chooses it on its base model, or why none does. The two loaders' preset lists
are read from it: FaceID variants (those that read a face embedding) are the FaceID loader's.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .choices import check_choice
from .variants import BY_NAME, Variant


@dataclass(frozen=True)
class Published:
    file: str          # the name it is published under (or the one guides give it)
    source: str        # the Hugging Face repository that publishes it
    preset: str = ""   # the unified loader preset that chooses it on its base model
    why_not: str = ""  # where no preset chooses it: why, and what loads it


_H94, _FACEID, _COMPOSITION = "h94/IP-Adapter", "h94/IP-Adapter-FaceID", "ostris/ip-composition-adapter"
# In preset order: a preset's place is that of its first row.
PUBLISHED: dict[str, Published] = {
    "light_sd15": Published("ip-adapter_sd15_light_v11.bin", _H94, "LIGHT - SD1.5 only"),
    "base_sd15": Published("ip-adapter_sd15.safetensors", _H94, "STANDARD"),
    "vit-h_sdxl": Published("ip-adapter_sdxl_vit-h.safetensors", _H94, "STANDARD"),
    "vit-g_sd15": Published("ip-adapter_sd15_vit-G.safetensors", _H94, "VIT-G"),
    "base_sdxl": Published("ip-adapter_sdxl.safetensors", _H94, "VIT-G"),
    "plus_sd15": Published("ip-adapter-plus_sd15.safetensors", _H94, "PLUS"),
    "plus_sdxl": Published("ip-adapter-plus_sdxl_vit-h.safetensors", _H94, "PLUS"),
    "plus-face_sd15": Published("ip-adapter-plus-face_sd15.safetensors", _H94, "PLUS FACE"),
    "plus-face_sdxl": Published("ip-adapter-plus-face_sdxl_vit-h.safetensors", _H94, "PLUS FACE"),
    "full-face_sd15": Published("ip-adapter-full-face_sd15.safetensors", _H94, "FULL FACE - SD1.5 only"),
    "composition_sd15": Published("ip_plus_composition_sd15.safetensors", _COMPOSITION, "COMPOSITION"),
    "composition_sdxl": Published("ip_plus_composition_sdxl.safetensors", _COMPOSITION, "COMPOSITION"),
    "plus_kolors": Published("ip_adapter_plus_general.bin", "Kwai-Kolors/Kolors-IP-Adapter-Plus", "KOLORS"),
    # XLabs publishes both as ip_adapter.safetensors; its ComfyUI nodes' instructions rename them so.
    "xlabs_flux": Published("flux-ip-adapter.safetensors", "XLabs-AI/flux-ip-adapter", "FLUX XLABS"),
    "xlabs-v2_flux": Published("flux-ip-adapter-v2.safetensors", "XLabs-AI/flux-ip-adapter-v2", "FLUX XLABS V2"),
    # InstantX publishes ip-adapter.bin in FLUX.1-dev-IP-Adapter; named after that repository to tell it apart.
    "instantx_flux": Published("FLUX.1-dev-IP-Adapter.bin", "InstantX/FLUX.1-dev-IP-Adapter", "FLUX INSTANTX"),
    "instantx_sd35": Published("ip-adapter.bin", "InstantX/SD3.5-Large-IP-Adapter", "SD3.5 INSTANTX"),
    "faceid_sd15": Published("ip-adapter-faceid_sd15.bin", _FACEID, "FACEID"),
    "faceid_sdxl": Published("ip-adapter-faceid_sdxl.bin", _FACEID, "FACEID"),
    "faceid-plus_sd15": Published("ip-adapter-faceid-plus_sd15.bin", _FACEID, "FACEID PLUS - SD1.5 only"),
    "faceid-plusv2_sd15": Published("ip-adapter-faceid-plusv2_sd15.bin", _FACEID, "FACEID PLUS V2"),
    "faceid-plusv2_sdxl": Published("ip-adapter-faceid-plusv2_sdxl.bin", _FACEID, "FACEID PLUS V2"),
    "portrait-v11_sd15": Published("ip-adapter-faceid-portrait-v11_sd15.bin", _FACEID, "FACEID PORTRAIT"),
    "portrait_sdxl": Published("ip-adapter-faceid-portrait_sdxl.bin", _FACEID, "FACEID PORTRAIT"),
    "portrait_sd15": Published("ip-adapter-faceid-portrait_sd15.bin", _FACEID, why_not=(
        "FACEID PORTRAIT on SD1.5 is its successor portrait-v11 (the same layout); load this one with Load IP-Adapter")),
    "portrait-unnorm_sdxl": Published("ip-adapter-faceid-portrait_sdxl_unnorm.bin", _FACEID,
                                      "FACEID PORTRAIT UNNORM - SDXL only"),
    "faceid-plus_kolors": Published("ipa-faceid-plus.bin", "Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus", "FACEID KOLORS"),
}
MODEL_BASE = {"kolors": "sdxl"}  # Kolors UNets have the SDXL layout: the loaders see them as SDXL


def model_base(variant: Variant) -> str:
    """The base a unified loader sees in the model the variant is for: "sd15", "sdxl", "flux" or "sd35"."""
    return MODEL_BASE.get(variant.base, variant.base)


def presets(faceid: bool) -> dict[str, dict[str, str]]:
    """{preset: {model base: variant name}} of the FaceID unified loader (``faceid``) or the other one."""
    table: dict[str, dict[str, str]] = {}
    for name, row in PUBLISHED.items():
        variant = BY_NAME[name]
        if row.preset and (variant.encoder_output == "face") == faceid:
            table.setdefault(row.preset, {})[model_base(variant)] = name
    return table


PRESETS, FACEID_PRESETS = presets(faceid=False), presets(faceid=True)


def preset_variant(preset: str, base: str, table: dict = PRESETS) -> Variant:
    """The variant a preset of ``table`` means on a base model (``model_base``), or ValueError saying why not."""
    check_choice("preset", preset, table)
    name = table[preset].get(base)
    if name is None:
        raise ValueError(f"preset: '{preset}' has no {base.upper()} IP-Adapter; choose another preset")
    return BY_NAME[name]


def plain(file_name: str) -> str:
    """A file name without folder and extension, lower case, without "-", "_", "." and spaces: how names are compared."""
    stem = os.path.splitext(os.path.basename(file_name.replace("\\", "/")))[0]
    return re.sub(r"[-_. ]", "", stem).lower()


def lora_file(variant: Variant) -> str:
    """The public name of a FaceID adapter's LoRA (the adapter's, with _lora)."""
    stem = PUBLISHED[variant.name].file.rsplit(".", 1)[0]
    return f"{stem}_lora.safetensors"
