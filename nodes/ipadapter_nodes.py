"""IP-Adapter nodes: load an adapter file, apply it to a model with a reference image."""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io

from ..ipadapter_core.attention import KV_SCALINGS, AdapterSpec
from ..ipadapter_core.embeds import COMBINE_MODES, combine_embeds
from ..ipadapter_core.loader import AdapterFile, load_adapter
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import (ENCODER_FILE_PATTERNS, ENCODERS, PRESETS, PUBLIC_FILES, check_encoder,
                                       files_named_like, preset_variant)
from ..ipadapter_core.weights import WEIGHT_TYPES, layer_weights
from .ipadapter_patch import AdapterModelMismatch, check_fit, cross_attention_layers, patch_model

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
    def validate_inputs(cls, ipadapter_file: str) -> bool | str:
        """Refuse a missing file when the prompt is queued, before anything runs."""
        if folder_paths.get_full_path(FOLDER, ipadapter_file) is None:
            return (f"ipadapter_file: '{ipadapter_file}' is not in the ipadapter model folders "
                    f"({', '.join(folder_paths.get_folder_paths(FOLDER))})")
        return True

    @classmethod
    def execute(cls, ipadapter_file: str) -> io.NodeOutput:
        adapter = load_adapter(folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file))
        return io.NodeOutput(LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj)))


def _clip_embeds(variant, clip_vision, image: torch.Tensor) -> torch.Tensor:
    """The CLIP output this variant reads: pooled image_embeds [n, E] or penultimate states [n, N, E]."""
    encoded = clip_vision.encode_image(image[..., :3])
    return encoded.image_embeds if variant.encoder_output == "image_embeds" else encoded.penultimate_hidden_states


def _check_image(name: str, image: torch.Tensor | None) -> None:
    if image is not None and (image.ndim != 4 or image.shape[-1] not in (3, 4) or min(image.shape[1:3]) < 2):
        raise ValueError(f"{name}: expected an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}")


@torch.no_grad()
def encode_reference(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, combine: str = "concat",
                     negative: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens [1, T', D] for a batch of n reference images: T' = n·T with
    ``concat``, T after any other combine mode. The uncond side encodes ``negative`` if given, else
    what the reference implementations use: zero embeds (pooled) or a neutral image (hidden states)."""
    variant, name = adapter.file.variant, adapter.file.name
    _check_image("image", image)
    _check_image("image_negative", negative)
    encoded = clip_vision.encode_image(image[..., :3])
    check_encoder(variant, name, encoded.penultimate_hidden_states.shape[-1], encoded.image_embeds.shape[-1])
    embeds = encoded.image_embeds if variant.encoder_output == "image_embeds" else encoded.penultimate_hidden_states
    if negative is not None:
        uncond = _clip_embeds(variant, clip_vision, negative)
        uncond = uncond[torch.arange(embeds.shape[0]) % uncond.shape[0]]
    elif variant.encoder_output == "image_embeds":
        uncond = torch.zeros_like(embeds)
    else:
        neutral = torch.tensor(CLIP_MEAN).expand(1, *image.shape[1:3], 3)
        uncond = _clip_embeds(variant, clip_vision, neutral).expand_as(embeds)
    embeds, uncond = combine_embeds(embeds, combine), combine_embeds(uncond, combine)
    cond_tokens = adapter.projection(embeds.float().cpu())
    uncond_tokens = adapter.projection(uncond.float().cpu())
    if not (torch.isfinite(cond_tokens).all() and torch.isfinite(uncond_tokens).all()):
        raise ValueError(f"image: the CLIP vision encoding of the reference gave NaN or inf image tokens for {name}")
    width = cond_tokens.shape[-1]
    return cond_tokens.reshape(1, -1, width), uncond_tokens.reshape(1, -1, width)


def adapter_spec(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, weight: float,
                 weight_type: str = "linear", start_at: float = 0.0, end_at: float = 1.0,
                 embeds_scaling: str = "V only", attn_mask: torch.Tensor | None = None,
                 composition_weight: float | None = None) -> AdapterSpec:
    """Everything the patch needs, decided once: per-layer weights, K/V weights, sigma range, mask."""
    if not 0.0 <= start_at < end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must be below end_at ({end_at}), both within 0..1")
    layers, blocks = cross_attention_layers(model)
    check_fit(adapter.file, layers)
    weights = layer_weights(weight_type, weight, [(layer.key[0], layer.transformer_index) for layer in layers],
                            blocks, composition_weight)
    sigma_range = None
    if (start_at, end_at) != (0.0, 1.0):
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
    mask = None
    if attn_mask is not None:
        if attn_mask.ndim not in (2, 3) or (attn_mask.ndim == 3 and attn_mask.shape[0] != 1):
            raise ValueError(f"attn_mask: expected one MASK [1, H, W], got shape {tuple(attn_mask.shape)}")
        mask = attn_mask.reshape(attn_mask.shape[-2:]).float().clamp(0, 1)
    file = adapter.file
    ids = range(1, 2 * len(file.layer_widths), 2)
    return AdapterSpec(cond, uncond, tuple(file.ip_adapter[f"{i}.to_k_ip.weight"] for i in ids),
                       tuple(file.ip_adapter[f"{i}.to_v_ip.weight"] for i in ids), weights.weights,
                       weights.swapped, embeds_scaling, sigma_range, mask)


def apply_adapter(model, adapter: LoadedAdapter, clip_vision, image: torch.Tensor, weight: float,
                  combine: str = "concat", negative: torch.Tensor | None = None, **options):
    """What both Apply nodes do: check the fit first (cheaper than encoding, and the deeper mismatch),
    encode the reference, and patch a clone with the spec ``options`` describe (see adapter_spec)."""
    check_fit(adapter.file, cross_attention_layers(model)[0])
    cond, uncond = encode_reference(adapter, clip_vision, image, combine, negative)
    return patch_model(model, adapter.file, adapter_spec(model, adapter, cond, uncond, weight, **options))


def _common_inputs():
    return [
        io.Model.Input("model", tooltip="The model to steer; it is cloned, never modified."),
        Adapter.Input("ipadapter", tooltip="From Load IP-Adapter."),
        io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the adapter was trained with "
                                                   "(the error names it if another is connected)."),
        io.Image.Input("image", tooltip="The reference image; a batch of images is used together."),
        io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="Scale of the image attention; 0 leaves the model unchanged."),
        io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear",
                       tooltip="How the weight spreads over the UNet's attention blocks: curves (ease in/out: less "
                               "in early or late blocks), or block maps for SD1.5/SDXL (style transfer, composition; "
                               "'precise' ones also guide away from the reference on the other blocks)."),
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling schedule after which the adapter starts."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling schedule after which the adapter stops."),
    ]


_MASK_INPUT = io.Mask.Input("attn_mask", optional=True,
                            tooltip="Where the reference applies (white) in the generated image; any size.")


class ImagePromptApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApply",
            display_name="Apply IP-Adapter",
            category=CATEGORY,
            description="Steers the model with a reference image through decoupled cross-attention on every "
                        "cross-attention layer (the middle block included). The input model is not changed.",
            inputs=[*_common_inputs(), _MASK_INPUT],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, clip_vision, image, weight, weight_type="linear",
                start_at=0.0, end_at=1.0, attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, weight, weight_type=weight_type,
                                           start_at=start_at, end_at=end_at, attn_mask=attn_mask))


class ImagePromptApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApplyAdvanced",
            display_name="Apply IP-Adapter (Advanced)",
            category=CATEGORY,
            description="Apply IP-Adapter with control over how several images combine, where the weight acts "
                        "(embeds scaling), the unconditional image, and the composition blocks' own weight.",
            inputs=[
                *_common_inputs(),
                io.Combo.Input("combine_embeds", options=list(COMBINE_MODES), default="concat",
                               tooltip="Several reference images: concat keeps all (more tokens); the others merge "
                                       "their embeddings into one (subtract: first minus the rest)."),
                io.Combo.Input("embeds_scaling", options=list(KV_SCALINGS), default="V only",
                               tooltip="Where the weight acts: the attention output (V only), keys and values, or "
                                       "with the C penalty that damps shallow layers (lets weights above 1 work)."),
                io.Float.Input("composition_weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Weight of the layout blocks for the style-and-composition and precise types."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="An image whose look to steer away from (replaces the neutral uncond image)."),
                _MASK_INPUT,
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, clip_vision, image, weight, weight_type, start_at, end_at,
                combine_embeds, embeds_scaling, composition_weight, image_negative=None,
                attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, weight, combine_embeds,
                                           image_negative, weight_type=weight_type, start_at=start_at, end_at=end_at,
                                           embeds_scaling=embeds_scaling, attn_mask=attn_mask,
                                           composition_weight=composition_weight))


class ImagePromptUnifiedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptUnifiedLoader",
            display_name="IP-Adapter Unified Loader",
            category=CATEGORY,
            description="Finds the IP-Adapter of a preset for the connected model (SD1.5 or SDXL) and the CLIP "
                        "vision it needs, under the file names users have; a missing file is named in the error.",
            inputs=[io.Model.Input("model", tooltip="The model the adapter is for; passed through unchanged."),
                    io.Combo.Input("preset", options=list(PRESETS), default="STANDARD",
                                   tooltip="Which adapter: light, standard, ViT-G, plus, plus face, full face, "
                                           "composition.")],
            outputs=[io.Model.Output(), Adapter.Output(display_name="ipadapter"), io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, model, preset: str) -> io.NodeOutput:
        import comfy.clip_vision
        layers, _ = cross_attention_layers(model)
        base = {768: "sd15", 2048: "sdxl"}.get(layers[0].context_dim if layers else 0)
        if base is None:
            raise ValueError("model: the unified loader knows SD1.5 (context 768) and SDXL (context 2048) UNets; "
                             "load an adapter file with Load IP-Adapter instead")
        variant = preset_variant(preset, base)
        misfits = []
        for name in files_named_like(PUBLIC_FILES[variant.name][0], folder_paths.get_filename_list(FOLDER)):
            adapter = load_adapter(folder_paths.get_full_path_or_raise(FOLDER, name))
            try:
                check_fit(adapter, layers)
                break
            except AdapterModelMismatch:
                misfits.append(name)
        else:
            found = f"; named like it but made for another UNet: {', '.join(misfits)}" if misfits else ""
            raise FileNotFoundError(f"preset '{preset}' on an {base.upper()} model needs "
                                    f"{PUBLIC_FILES[variant.name][1]} in {', '.join(folder_paths.get_folder_paths(FOLDER))}"
                                    f"{found}")
        clip_files = files_named_like(ENCODER_FILE_PATTERNS[variant.encoder],
                                      folder_paths.get_filename_list("clip_vision"))
        if not clip_files:
            raise FileNotFoundError(f"preset '{preset}' needs the CLIP vision {variant.encoder}: "
                                    f"{ENCODERS[variant.encoder]['file']} in "
                                    f"{', '.join(folder_paths.get_folder_paths('clip_vision'))}")
        clip_vision = comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", clip_files[0]))
        loaded = LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj))
        return io.NodeOutput(model, loaded, clip_vision)


NODES = [ImagePromptUnifiedLoader, ImagePromptAdapterLoader, ImagePromptApply, ImagePromptApplyAdvanced]
