"""IP-Adapter nodes: load an adapter file, apply it to a model with a reference image."""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io

from ..ipadapter_core.attention import AdapterSpec
from ..ipadapter_core.loader import AdapterFile, load_adapter
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import check_encoder
from .ipadapter_patch import patch_model

FOLDER = "ipadapter"
CATEGORY = "image_prompt"
# CLIP's normalisation mean: an image of this colour encodes to zeros after preprocessing, the
# unconditional image of the reference implementations (§2.5 of the notes).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def register_model_folder() -> None:
    """models/ipadapter, plus any ``ipadapter:`` entries of the user's extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    if default not in paths:
        paths.append(default)
    if not extensions:
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter file with its projection model built (float32, CPU)."""
    file: AdapterFile
    projection: torch.nn.Module


Adapter = io.Custom("IMAGE_PROMPT_ADAPTER")


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
    def execute(cls, ipadapter_file: str) -> io.NodeOutput:
        adapter = load_adapter(folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file))
        return io.NodeOutput(LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj)))


def encode_reference(adapter: LoadedAdapter, clip_vision, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens [1, T·n, D] for a batch of n reference images (their tokens concatenated)."""
    variant, name = adapter.file.variant, adapter.file.name
    if image.ndim != 4 or image.shape[-1] not in (3, 4) or min(image.shape[1:3]) < 2:
        raise ValueError(f"image: expected an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}")
    encoded = clip_vision.encode_image(image[..., :3])
    check_encoder(variant, name, encoded.penultimate_hidden_states.shape[-1], encoded.image_embeds.shape[-1])
    if variant.encoder_output == "image_embeds":
        embeds = encoded.image_embeds
        uncond = torch.zeros_like(embeds)
    else:
        embeds = encoded.penultimate_hidden_states
        neutral = torch.tensor(CLIP_MEAN).expand(1, *image.shape[1:3], 3)
        uncond = clip_vision.encode_image(neutral).penultimate_hidden_states.expand_as(embeds)
    projection = adapter.projection
    with torch.no_grad():
        cond_tokens = projection(embeds.float().cpu())
        uncond_tokens = projection(uncond.float().cpu())
    width = cond_tokens.shape[-1]
    return cond_tokens.reshape(1, -1, width), uncond_tokens.reshape(1, -1, width)


class ImagePromptApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApply",
            display_name="Apply IP-Adapter",
            category=CATEGORY,
            description="Steers the model with a reference image through decoupled cross-attention on every "
                        "cross-attention layer (the middle block included). The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to steer; it is cloned, never modified."),
                Adapter.Input("ipadapter", tooltip="From Load IP-Adapter."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the adapter was trained with "
                                                           "(the error names it if another is connected)."),
                io.Image.Input("image", tooltip="The reference image; several images are used together."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Scale of the image attention; 0 leaves the model unchanged."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, clip_vision, image: torch.Tensor, weight: float) -> io.NodeOutput:
        cond, uncond = encode_reference(ipadapter, clip_vision, image)
        file = ipadapter.file
        ids = range(1, 2 * len(file.layer_widths), 2)
        spec = AdapterSpec(cond, uncond, tuple(file.ip_adapter[f"{i}.to_k_ip.weight"] for i in ids),
                           tuple(file.ip_adapter[f"{i}.to_v_ip.weight"] for i in ids),
                           (weight,) * len(file.layer_widths))
        return io.NodeOutput(patch_model(model, file, spec))


NODES = [ImagePromptAdapterLoader, ImagePromptApply]
