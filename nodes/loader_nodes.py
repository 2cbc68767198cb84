"""IP-Adapter loaders: a file by name, or the file (and CLIP vision) of a preset that fits the model."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import folder_paths
from comfy_api.latest import io

from ..ipadapter_core.loader import load_adapter
from ..ipadapter_core.model_files import (ADAPTER_FOLDERS, Found, choose_adapter, choose_encoder, named_row,
                                          recognise, short)
from ..ipadapter_core.presets import PRESETS, PUBLISHED, preset_variant
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import ENCODERS, layout_mates
from .ipadapter_encode import LoadedAdapter, load
from .ipadapter_inputs import CATEGORY, REUSE_INPUT, Adapter
from .patch.layers import AdapterModelMismatch, check_fit, cross_attention_layers

FOLDER = ADAPTER_FOLDERS[0]


def register_model_folder() -> None:
    """models/ipadapter, models/xlabs/ipadapters and models/ipadapter-flux, plus any ``ipadapter:`` entries of the
    user's extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    for folder in (os.path.join(folder_paths.models_dir, *sub.split("/")) for sub in ADAPTER_FOLDERS):
        if folder not in paths:
            paths.append(folder)
    if not extensions:
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def model_base(model) -> str:
    """"sd15", "sdxl" (Kolors has the SDXL layout), "flux" or "sd35" from the layers an adapter patches."""
    layers, _ = cross_attention_layers(model)
    family, context = (layers[0].family, layers[0].context_dim) if layers else ("unet", 0)
    base = {"flux": "flux", "sd3": "sd35"}.get(family) or {768: "sd15", 2048: "sdxl"}.get(context)
    if base is None:
        raise ValueError("model: the unified loaders know SD1.5 (context 768) and SDXL (context 2048) UNets, Flux "
                         "transformers and SD3.5 MMDiTs; load an adapter file with Load IP-Adapter instead")
    return base


def scan(folder: str) -> list[tuple[str, Found]]:
    """Every file the host lists in ``folder`` (all its paths, extra_model_paths.yaml's included) with what it is."""
    return [(name, recognise(folder_paths.get_full_path_or_raise(folder, name), folder))
            for name in folder_paths.get_filename_list(folder)]


def find_adapter(model, variant, preset: str) -> LoadedAdapter:
    """The adapter file that is ``variant`` (read from its weights, whatever its name) and fits ``model``; else an
    error listing what each file found is and naming the file to get."""
    layers, _ = cross_attention_layers(model)

    def fits(adapter) -> bool:
        try:
            check_fit(adapter, layers)
            return True
        except AdapterModelMismatch:
            return False

    found, seen = choose_adapter(scan(FOLDER), variant, fits)
    if found is None:
        row = PUBLISHED[variant.name]
        raise FileNotFoundError(f"preset '{preset}' on an {variant.base.upper()} model needs {row.file} in "
                                f"{', '.join(folder_paths.get_folder_paths(FOLDER))} (the {short(variant)} IP-Adapter "
                                f"from huggingface.co/{row.source}, under any file name: files are recognised by "
                                f"their weights); found there: {'; '.join(seen) or 'no files'}")
    adapter = replace(load_adapter(found.path), variant=variant)  # its layout, read as the row the preset means
    if named_row(found) is None and len(layout_mates(variant)) > 1:
        logging.info("preset '%s': %s has the weights' shapes of %s and its name names none: read as %s", preset,
                     adapter.name, ", ".join(v.name for v in layout_mates(variant)), variant.name)
    return LoadedAdapter(adapter, build_projection(variant, adapter.image_proj))


def find_clip_vision(encoder: str, preset: str, pooled: bool = False):
    """The host's CLIP vision of a file that holds ``encoder`` (read from its weights, whatever its name); else an
    error listing what each file found is and naming the file to get."""
    import comfy.clip_vision
    found, seen = choose_encoder(scan("clip_vision"), encoder, pooled)
    if found is None:
        needed = ENCODERS[encoder]
        raise FileNotFoundError(f"preset '{preset}' needs the CLIP vision {encoder}: {needed['file']} in "
                                f"{', '.join(folder_paths.get_folder_paths('clip_vision'))} (from huggingface.co/"
                                f"{needed['source']}, under any file name); found there: {'; '.join(seen) or 'no files'}")
    return comfy.clip_vision.load(found.path)


class ImagePromptUnifiedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptUnifiedLoader",
            display_name="IP-Adapter Unified Loader",
            category=CATEGORY,
            description="Finds the IP-Adapter of a preset for the connected model (SD1.5, SDXL, Flux or SD3.5) and the "
                        "CLIP vision it needs, each recognised by its weights whatever the file is called; when none "
                        "fits, the error lists what each file found is and names the file to get.",
            inputs=[io.Model.Input("model", tooltip="The model the adapter is for; passed through unchanged."),
                    io.Combo.Input("preset", options=list(PRESETS), default="STANDARD",
                                   tooltip="Which adapter: light, standard, ViT-G, plus, plus face, full face, "
                                           "composition, Kolors plus, XLabs' Flux v1 or v2, InstantX's Flux or "
                                           "SD3.5 Large."),
                    REUSE_INPUT],
            outputs=[io.Model.Output(), Adapter.Output(display_name="ipadapter"), io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, model, preset: str, ipadapter: LoadedAdapter | None = None) -> io.NodeOutput:
        variant = preset_variant(preset, model_base(model))
        if ipadapter is None or ipadapter.file.variant != variant or ipadapter.clip_vision is None:
            ipadapter = find_adapter(model, variant, preset)
            clip_vision = find_clip_vision(variant.encoder, preset, variant.encoder_output == "pooled")
            ipadapter = replace(ipadapter, clip_vision=clip_vision)
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
