"""IP-Adapter loaders: a file by name, or the file (and CLIP vision) of a preset that fits the model."""
from __future__ import annotations

import os
from dataclasses import replace

import folder_paths
from comfy_api.latest import io

from ..ipadapter_core.loader import load_adapter
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import (ENCODER_FILE_PATTERNS, ENCODERS, PRESETS, PUBLIC_FILES, files_named_like,
                                       preset_variant)
from .ipadapter_encode import LoadedAdapter, load
from .ipadapter_inputs import CATEGORY, REUSE_INPUT, Adapter
from .patch.layers import AdapterModelMismatch, check_fit, cross_attention_layers

FOLDER = "ipadapter"
XLABS_FOLDER = ("xlabs", "ipadapters")  # where XLabs' own nodes read its Flux adapters from
INSTANTX_FOLDER = ("ipadapter-flux",)  # where Shakker-Labs' nodes read InstantX's Flux adapter from


def register_model_folder() -> None:
    """models/ipadapter, models/xlabs/ipadapters and models/ipadapter-flux, plus any ``ipadapter:`` entries of the
    user's extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    for folder in (default, *(os.path.join(folder_paths.models_dir, *sub) for sub in (XLABS_FOLDER, INSTANTX_FOLDER))):
        if folder not in paths:
            paths.append(folder)
    if not extensions:
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def model_base(model) -> str:
    """"sd15", "sdxl" (Kolors has the SDXL layout) or "flux" from the width the model's image K/V are made from."""
    layers, _ = cross_attention_layers(model)
    base = {768: "sd15", 2048: "sdxl", 4096: "flux"}.get(layers[0].context_dim if layers else 0)
    if base is None:
        raise ValueError("model: the unified loaders know SD1.5 (context 768) and SDXL (context 2048) UNets and Flux "
                         "transformers; load an adapter file with Load IP-Adapter instead")
    return base


def find_adapter(model, variant, preset: str) -> LoadedAdapter:
    """The adapter file named like the public one of ``variant`` that fits ``model``; else an error naming
    the file to download and the folder."""
    layers, _ = cross_attention_layers(model)
    misfits = []
    for name in files_named_like(PUBLIC_FILES[variant.name][0], folder_paths.get_filename_list(FOLDER)):
        adapter = load_adapter(folder_paths.get_full_path_or_raise(FOLDER, name))
        try:
            check_fit(adapter, layers)
            return LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj))
        except AdapterModelMismatch:
            misfits.append(name)
    found = f"; named like it but made for another UNet: {', '.join(misfits)}" if misfits else ""
    raise FileNotFoundError(f"preset '{preset}' on an {variant.base.upper()} model needs {PUBLIC_FILES[variant.name][1]} "
                            f"in {', '.join(folder_paths.get_folder_paths(FOLDER))}{found}")


def find_clip_vision(encoder: str, preset: str):
    import comfy.clip_vision
    files = files_named_like(ENCODER_FILE_PATTERNS[encoder], folder_paths.get_filename_list("clip_vision"))
    if not files:
        raise FileNotFoundError(f"preset '{preset}' needs the CLIP vision {encoder}: {ENCODERS[encoder]['file']} in "
                                f"{', '.join(folder_paths.get_folder_paths('clip_vision'))}")
    return comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", files[0]))


class ImagePromptUnifiedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptUnifiedLoader",
            display_name="IP-Adapter Unified Loader",
            category=CATEGORY,
            description="Finds the IP-Adapter of a preset for the connected model (SD1.5, SDXL or Flux) and the CLIP "
                        "vision it needs, under the file names users have; a missing file is named in the error.",
            inputs=[io.Model.Input("model", tooltip="The model the adapter is for; passed through unchanged."),
                    io.Combo.Input("preset", options=list(PRESETS), default="STANDARD",
                                   tooltip="Which adapter: light, standard, ViT-G, plus, plus face, full face, "
                                           "composition, Kolors plus, XLabs' Flux v1 or v2, InstantX's Flux."),
                    REUSE_INPUT],
            outputs=[io.Model.Output(), Adapter.Output(display_name="ipadapter"), io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, model, preset: str, ipadapter: LoadedAdapter | None = None) -> io.NodeOutput:
        variant = preset_variant(preset, model_base(model))
        if ipadapter is None or ipadapter.file.variant != variant or ipadapter.clip_vision is None:
            ipadapter = find_adapter(model, variant, preset)
            ipadapter = replace(ipadapter, clip_vision=find_clip_vision(variant.encoder, preset))
        return io.NodeOutput(model, ipadapter, ipadapter.clip_vision)


class ImagePromptAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptAdapterLoader",
            display_name="Load IP-Adapter",
            category=CATEGORY,
            description="Loads an IP-Adapter file from models/ipadapter and recognises its variant from its weights.",
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="An IP-Adapter file (.safetensors or .bin) in models/ipadapter.")],
            outputs=[Adapter.Output(display_name="ipadapter")],
        )

    @classmethod
    def validate_inputs(cls, ipadapter_file: str) -> bool | str:
        """Refuse a missing file when the prompt is queued, before anything runs."""
        if folder_paths.get_full_path(FOLDER, ipadapter_file) is None:
            return (f"ipadapter_file: '{ipadapter_file}' is not in the ipadapter model folders "
                    f"({', '.join(folder_paths.get_folder_paths(FOLDER))})")
        return True

    @classmethod
    def execute(cls, ipadapter_file: str) -> io.NodeOutput:
        return io.NodeOutput(load(folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file)))


NODES = [ImagePromptUnifiedLoader, ImagePromptAdapterLoader]
