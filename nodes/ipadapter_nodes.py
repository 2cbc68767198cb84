"""IP-Adapter nodes: load an adapter file, and apply it to a model with reference images or embeds."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..ipadapter_core import prep
from ..ipadapter_core.attention import KV_SCALINGS, AdapterSpec
from ..ipadapter_core.embeds import COMBINE_MODES, combine_embeds, enhance_embeds, merge_tile_embeds
from ..ipadapter_core.loader import AdapterFile, load_adapter
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import (ENCODER_FILE_PATTERNS, ENCODERS, PRESETS, PUBLIC_FILES, check_embeds,
                                       check_encoder, files_named_like, preset_variant)
from ..ipadapter_core.weights import WEIGHT_TYPES, explicit_layer_weights, layer_weights
from .ipadapter_patch import AdapterModelMismatch, check_fit, cross_attention_layers, patch_model

FOLDER = "ipadapter"
CATEGORY = "image_prompt"
ENCODE_BATCH = 16  # reference images per CLIP vision call
WHOLE_IMAGE = (1, 1.0)  # enhance (tiles per side, ratio) off: CLIP vision sees the whole image only


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
    """An adapter file with its projection model built (float32, CPU), and the encoders a unified
    loader found for it (used when an apply node has none connected)."""
    file: AdapterFile
    projection: torch.nn.Module
    clip_vision: object | None = None
    insightface: object | None = None


Adapter = io.Custom("IMAGE_PROMPT_ADAPTER")
Embeds = io.Custom("EMBEDS")  # CLIP vision outputs (pooled [n, E] or hidden [n, N, E]) or face embeddings [n, 512]


def load(path: str, **encoders) -> LoadedAdapter:
    adapter = load_adapter(path)
    return LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj), **encoders)


def clip_vision_for(adapter: LoadedAdapter, clip_vision, encoder: str | None = None):
    """The connected CLIP vision, else the one the unified loader attached; an error names the one needed."""
    clip_vision = clip_vision if clip_vision is not None else adapter.clip_vision
    if clip_vision is None:
        encoder = encoder or adapter.file.variant.encoder
        raise ValueError(f"clip_vision: {adapter.file.name} needs the CLIP vision {encoder} "
                         f"({ENCODERS[encoder]['file']} in models/clip_vision): connect a Load CLIP Vision node, "
                         f"or load the adapter with the unified loader")
    return clip_vision


@torch.no_grad()
def encode_images(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, output: str, name: str = "image",
                  encoder: str | None = None) -> torch.Tensor:
    """CLIP vision ``output`` ("image_embeds" or "penultimate") of each image: [n, E] or [n, N, E],
    in batches with the host's progress bar. The encoder is checked against the adapter's."""
    image = prep.as_rgb(image, name)
    variant = adapter.file.variant
    encoder = encoder or variant.encoder
    progress = comfy.utils.ProgressBar(image.shape[0])
    parts = []
    for start in range(0, image.shape[0], ENCODE_BATCH):
        encoded = clip_vision.encode_image(image[start:start + ENCODE_BATCH])
        if start == 0:
            check_encoder(replace(variant, encoder=encoder), adapter.file.name,
                          encoded.penultimate_hidden_states.shape[-1], encoded.image_embeds.shape[-1])
        parts.append(encoded.image_embeds if output == "image_embeds" else encoded.penultimate_hidden_states)
        progress.update(parts[-1].shape[0])
    return torch.cat(parts).float().cpu()


def neutral_embeds(adapter: LoadedAdapter, clip_vision, like: torch.Tensor, output: str | None = None,
                   encoder: str | None = None) -> torch.Tensor:
    """The unconditional embeds of the reference implementations, shaped like ``like``: zeros for pooled
    and face embeds; for hidden states, the encoding of an image of CLIP's mean colour (zeros after CLIP's
    normalisation), which is what the official code feeds."""
    if (output or adapter.file.variant.encoder_output) != "penultimate":
        return torch.zeros_like(like)
    neutral = torch.tensor(prep.CLIP_MEAN).expand(1, 224, 224, 3)
    return encode_images(adapter, clip_vision, neutral, "penultimate", encoder=encoder).expand_as(like)


def enhanced_embeds(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, output: str, tiles: int,
                    ratio: float) -> torch.Tensor:
    """The CLIP-vision enhancer: each image is also encoded as a tiles x tiles grid, merged back to one
    image's embeds (merge_tile_embeds) and joined to the whole image's (enhance_embeds)."""
    grid = prep.grid_tiles(prep.as_rgb(image), tiles)
    tile_embeds = encode_images(adapter, clip_vision, grid.flatten(0, 1), output).unflatten(0, grid.shape[:2])
    return enhance_embeds(encode_images(adapter, clip_vision, image, output), merge_tile_embeds(tile_embeds), ratio)


def reference_embeds(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, negative: torch.Tensor | None = None,
                     enhance: tuple[int, float] = WHOLE_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond CLIP embeds of reference images: the output the variant reads (with ``enhance``,
    (tiles per side, ratio), above one tile: the enhancer's), and for uncond the encoding of ``negative``
    if given, else the neutral embeds."""
    if adapter.file.variant.encoder_output == "face":
        raise ValueError(f"ipadapter: {adapter.file.name} is a FaceID adapter: it reads face embeddings, not "
                         f"CLIP image embeds; use Apply IP-Adapter FaceID")
    clip_vision = clip_vision_for(adapter, clip_vision)
    output = adapter.file.variant.encoder_output
    tiles, ratio = enhance
    embeds = (encode_images(adapter, clip_vision, image, output) if tiles == 1
              else enhanced_embeds(adapter, clip_vision, image, output, tiles, ratio))
    if negative is None:
        return embeds, neutral_embeds(adapter, clip_vision, embeds)
    return embeds, encode_images(adapter, clip_vision, negative, output, "image_negative")


@torch.no_grad()
def image_tokens(adapter: LoadedAdapter, embeds: torch.Tensor, uncond: torch.Tensor | None = None,
                 combine: str = "concat", unfold: bool = False, clip_hidden=None,
                 shortcut_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens from EMBEDS: [1, n*T, D] (every latent sees all n images, or their
    combination), or [n, T, D] with ``unfold`` (latent i sees image i). ``uncond`` defaults to zeros
    and is cycled to n. FaceID-Plus also takes the CLIP hidden states (cond, uncond) of the face crops."""
    variant, name = adapter.file.variant, adapter.file.name
    check_embeds(variant, name, tuple(embeds.shape))
    uncond = torch.zeros_like(embeds) if uncond is None else uncond
    check_embeds(variant, name, tuple(uncond.shape))
    uncond = uncond[torch.arange(embeds.shape[0]) % uncond.shape[0]]
    if not unfold:
        embeds, uncond = combine_embeds(embeds, combine), combine_embeds(uncond, combine)
        clip_hidden = clip_hidden and tuple(combine_embeds(h, combine) for h in clip_hidden)

    def project(x, hidden):
        x = x.float().cpu()
        if variant.projection == "faceid_plus":
            if hidden is None:
                raise ValueError(f"clip_vision: {name} ({variant.name}) also needs the CLIP vision "
                                 f"{variant.clip_encoder} of the face image")
            return adapter.projection(x, hidden.float().cpu()[torch.arange(x.shape[0]) % hidden.shape[0]],
                                      shortcut_scale)
        return adapter.projection(x)

    hidden_cond, hidden_uncond = clip_hidden or (None, None)
    cond_tokens, uncond_tokens = project(embeds, hidden_cond), project(uncond, hidden_uncond)
    if not (torch.isfinite(cond_tokens).all() and torch.isfinite(uncond_tokens).all()):
        raise ValueError(f"embeds: the reference embeddings give NaN or inf image tokens for {name}; "
                         f"check the image or embeds fed to it")
    width = cond_tokens.shape[-1]
    if unfold:
        return cond_tokens, uncond_tokens
    return cond_tokens.reshape(1, -1, width), uncond_tokens.reshape(1, -1, width)


def encode_reference(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, combine: str = "concat",
                     negative: torch.Tensor | None = None, unfold: bool = False,
                     enhance: tuple[int, float] = WHOLE_IMAGE):
    """Cond and uncond image tokens of reference images (see image_tokens and reference_embeds)."""
    return image_tokens(adapter, *reference_embeds(adapter, clip_vision, image, negative, enhance), combine, unfold)


def _weights(weight) -> tuple[float, tuple[float, ...]]:
    """A weight, or a list of per-image weights (from a frame-weights node): (scalar, per-image)."""
    if isinstance(weight, (list, tuple)):
        values = tuple(float(w) for w in weight)
        if not values or not all(abs(w) < float("inf") for w in values):
            raise ValueError(f"weight: expected a number or a non-empty list of finite numbers, got {weight!r}")
        return 1.0, values
    return float(weight), ()


def adapter_spec(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, weight,
                 weight_type: str = "linear", start_at: float = 0.0, end_at: float = 1.0,
                 embeds_scaling: str = "V only", attn_mask: torch.Tensor | None = None,
                 composition_weight: float | None = None, block_weights: str = "") -> AdapterSpec:
    """Everything the patch needs, decided once: per-layer weights, K/V weights, sigma range, mask.
    ``block_weights`` ("index:weight, ...") replaces the weight type when given."""
    if not 0.0 <= start_at < end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must be below end_at ({end_at}), both within 0..1")
    weight, image_weights = _weights(weight)
    if image_weights and cond.shape[0] == 1:  # one image, a weight per latent
        cond, uncond = cond.expand(len(image_weights), -1, -1), uncond.expand(len(image_weights), -1, -1)
    layers, blocks = cross_attention_layers(model)
    check_fit(adapter.file, layers)
    indices = [(layer.key[0], layer.transformer_index) for layer in layers]
    if block_weights.strip():
        weights = explicit_layer_weights(block_weights, weight, indices, blocks)
    else:
        weights = layer_weights(weight_type, weight, indices, blocks, composition_weight)
    sigma_range = None
    if (start_at, end_at) != (0.0, 1.0):
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
    mask = None
    if attn_mask is not None:
        if attn_mask.ndim not in (2, 3) or 0 in attn_mask.shape:
            raise ValueError(f"attn_mask: expected a MASK [frames, H, W], got shape {tuple(attn_mask.shape)}")
        mask = attn_mask.reshape(-1, *attn_mask.shape[-2:]).float().clamp(0, 1)
    file = adapter.file
    ids = range(1, 2 * len(file.layer_widths), 2)
    return AdapterSpec(cond, uncond, tuple(file.ip_adapter[f"{i}.to_k_ip.weight"] for i in ids),
                       tuple(file.ip_adapter[f"{i}.to_v_ip.weight"] for i in ids), weights.weights,
                       weights.swapped, embeds_scaling, sigma_range, mask, image_weights)


def apply_tokens(model, adapter: LoadedAdapter, cond: torch.Tensor, uncond: torch.Tensor, weight, **options):
    """A patched clone of ``model`` with these image tokens (see adapter_spec for ``options``)."""
    return patch_model(model, adapter.file, adapter_spec(model, adapter, cond, uncond, weight, **options))


def apply_adapter(model, adapter: LoadedAdapter, clip_vision, image: torch.Tensor, weight, combine: str = "concat",
                  negative: torch.Tensor | None = None, unfold: bool = False, enhance: tuple[int, float] = WHOLE_IMAGE,
                  **options):
    """What the image apply nodes do: check the fit first (cheaper than encoding, and the deeper
    mismatch), encode the reference, and patch a clone."""
    check_fit(adapter.file, cross_attention_layers(model)[0])
    cond, uncond = encode_reference(adapter, clip_vision, image, combine, negative, unfold, enhance)
    return apply_tokens(model, adapter, cond, uncond, weight, **options)


def weight_input(name: str = "weight", tooltip: str = "Scale of the image attention; 0 leaves the model unchanged."):
    return io.Float.Input(name, default=1.0, min=-1.0, max=5.0, step=0.05, tooltip=tooltip)


WEIGHT_TYPE_INPUT = io.Combo.Input(
    "weight_type", options=list(WEIGHT_TYPES), default="linear",
    tooltip="How the weight spreads over the UNet's attention blocks: curves (ease in/out: less in early or late "
            "blocks), or block maps for SD1.5/SDXL (style transfer, composition; 'precise' ones also guide away "
            "from the reference on the other blocks).")
START_INPUT = io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                             tooltip="Share of the sampling schedule after which the adapter starts.")
END_INPUT = io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                           tooltip="Share of the sampling schedule after which the adapter stops.")
COMBINE_INPUT = io.Combo.Input(
    "combine_embeds", options=list(COMBINE_MODES), default="concat",
    tooltip="Several reference images: concat keeps all (more tokens); the others merge their embeddings into one "
            "(subtract: first minus the rest).")
SCALING_INPUT = io.Combo.Input(
    "embeds_scaling", options=list(KV_SCALINGS), default="V only",
    tooltip="Where the weight acts: the attention output (V only), keys and values, or with the C penalty that "
            "damps shallow layers (lets weights above 1 work).")
UNFOLD_INPUT = io.Boolean.Input("unfold_batch", default=False,
                                tooltip="Image i conditions latent i (animation frames) instead of every latent "
                                        "seeing all images; the batch cycles when it is longer.")
# the same, on nodes that had no unfold_batch at first: optional, so that their saved graphs keep their widgets
UNFOLD_LATER_INPUT = io.Boolean.Input("unfold_batch", default=False, optional=True, tooltip=UNFOLD_INPUT.tooltip)
NEGATIVE_INPUT = io.Image.Input("image_negative", optional=True,
                                tooltip="An image whose look to steer away from (replaces the neutral uncond image).")
MASK_INPUT = io.Mask.Input("attn_mask", optional=True,
                           tooltip="Where the reference applies (white) in the generated image; any size. A batch "
                                   "of masks gives mask i to latent (frame) i, the last one to the frames after it.")
CLIP_VISION_INPUT = io.ClipVision.Input(
    "clip_vision", optional=True,
    tooltip="The CLIP vision encoder the adapter was trained with (the error names it if another is connected); "
            "not needed after a unified loader, which attaches it.")


def model_inputs():
    return [io.Model.Input("model", tooltip="The model to steer; it is cloned, never modified."),
            Adapter.Input("ipadapter", tooltip="From Load IP-Adapter or a unified loader.")]


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


class ImagePromptApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApply",
            display_name="Apply IP-Adapter",
            category=CATEGORY,
            description="Steers the model with a reference image through decoupled cross-attention on every "
                        "cross-attention layer (the middle block included). The input model is not changed.",
            inputs=[*model_inputs(),
                    io.Image.Input("image", tooltip="The reference image; a batch of images is used together."),
                    weight_input(), WEIGHT_TYPE_INPUT, START_INPUT, END_INPUT, CLIP_VISION_INPUT, MASK_INPUT],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, image, weight, weight_type="linear", start_at=0.0, end_at=1.0,
                clip_vision=None, attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, weight, weight_type=weight_type,
                                           start_at=start_at, end_at=end_at, attn_mask=attn_mask))


BLOCK_WEIGHTS_INPUT = io.String.Input(
    "layer_weights", default="", multiline=True,
    tooltip="Optional per-block weights 'index:weight, ...' over the attention blocks (SD1.5: 0-15, middle 6; "
            "SDXL: 0-10, middle 4); when set it replaces the weight type, and unlisted blocks get 0.")


def advanced_inputs(*extra):
    """The Advanced node's inputs, with ``extra`` after its weights (for the nodes that extend it)."""
    return [*model_inputs(),
            io.Image.Input("image", tooltip="The reference image(s)."),
            weight_input(tooltip="Scale of the image attention (a list from Frame Weights gives one per image)."),
            WEIGHT_TYPE_INPUT, START_INPUT, END_INPUT, COMBINE_INPUT, SCALING_INPUT,
            io.Float.Input("composition_weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                           tooltip="Weight of the layout blocks for the style-and-composition and precise types."),
            *extra, UNFOLD_INPUT, BLOCK_WEIGHTS_INPUT, NEGATIVE_INPUT, MASK_INPUT, CLIP_VISION_INPUT]


class ImagePromptApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApplyAdvanced",
            display_name="Apply IP-Adapter (Advanced)",
            category=CATEGORY,
            description="Apply IP-Adapter with control over how several images combine, where the weight acts "
                        "(embeds scaling), the unconditional image, per-block weights, and one image per latent.",
            inputs=advanced_inputs(),
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, image, weight, weight_type, start_at, end_at, combine_embeds,
                embeds_scaling, composition_weight, unfold_batch=False, layer_weights="", image_negative=None,
                attn_mask=None, clip_vision=None, enhance: tuple[int, float] = WHOLE_IMAGE) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, weight, combine_embeds,
                                           image_negative, unfold_batch, enhance, weight_type=weight_type,
                                           start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
                                           attn_mask=attn_mask, composition_weight=composition_weight,
                                           block_weights=layer_weights))


class ImagePromptClipVisionEnhancer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptClipVisionEnhancer",
            display_name="Apply IP-Adapter (CLIP Vision Enhancer)",
            category=CATEGORY,
            description="Apply IP-Adapter (Advanced) with more of the reference's detail: CLIP vision also sees "
                        "each image cut into a grid of tiles, whose embeds are pooled back to one image's. One "
                        "image becomes two references, the whole (times enhance_ratio) and the tiles, joined by "
                        "combine_embeds; each of several images is a blend of the two by enhance_ratio.",
            inputs=advanced_inputs(
                io.Int.Input("enhance_tiles", default=2, min=1, max=prep.MAX_GRID,
                             tooltip="Tiles per side of the grid (1: the whole image only, as Advanced)."),
                io.Float.Input("enhance_ratio", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the whole image: one image, the whole reference's scale beside "
                                       "the tiles; several images, the blend (1: whole only, 0: tiles only).")),
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, enhance_tiles, enhance_ratio, **advanced) -> io.NodeOutput:
        return ImagePromptApplyAdvanced.execute(**advanced, enhance=(enhance_tiles, enhance_ratio))


class ImagePromptApplyEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApplyEmbeds",
            display_name="Apply IP-Adapter Embeds",
            category=CATEGORY,
            description="Apply IP-Adapter from EMBEDS (IP-Adapter Encode, Load Embeds, Combine Embeds) instead of "
                        "images, so references are encoded once and reused.",
            inputs=[*model_inputs(),
                    Embeds.Input("pos_embeds", tooltip="The reference embeds (IP-Adapter Encode's pos_embeds)."),
                    weight_input(tooltip="Scale of the image attention (a list gives one per image)."),
                    WEIGHT_TYPE_INPUT, START_INPUT, END_INPUT, SCALING_INPUT, UNFOLD_INPUT,
                    Embeds.Input("neg_embeds", optional=True,
                                 tooltip="Embeds to steer away from; default: the neutral embeds (zeros for "
                                         "pooled/face embeds, a mean-colour image's encoding with clip_vision)."),
                    MASK_INPUT, CLIP_VISION_INPUT],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, pos_embeds, weight, weight_type, start_at, end_at,
                embeds_scaling, unfold_batch=False, neg_embeds=None, attn_mask=None,
                clip_vision=None) -> io.NodeOutput:
        check_fit(ipadapter.file, cross_attention_layers(model)[0])
        check_embeds(ipadapter.file.variant, ipadapter.file.name, tuple(pos_embeds.shape))
        if neg_embeds is None and (clip_vision or ipadapter.clip_vision) is not None:
            neg_embeds = neutral_embeds(ipadapter, clip_vision_for(ipadapter, clip_vision), pos_embeds)
        cond, uncond = image_tokens(ipadapter, pos_embeds, neg_embeds, unfold=unfold_batch)
        return io.NodeOutput(apply_tokens(model, ipadapter, cond, uncond, weight, weight_type=weight_type,
                                          start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
                                          attn_mask=attn_mask))


class ImagePromptStyleComposition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptStyleComposition",
            display_name="IP-Adapter Style & Composition",
            category=CATEGORY,
            description="One image gives the style (style blocks), another the composition (layout blocks), in "
                        "one patch. Needs the SD1.5 or SDXL block layout.",
            inputs=[*model_inputs(),
                    io.Image.Input("image_style", tooltip="The image whose look (colours, textures) to take."),
                    io.Image.Input("image_composition", tooltip="The image whose layout to take."),
                    weight_input("weight_style", "Weight of the style image on the style blocks."),
                    weight_input("weight_composition", "Weight of the composition image on the layout blocks."),
                    io.Boolean.Input("expand_style", default=False,
                                     tooltip="Give the style image every block but the layout ones "
                                             "(strong style transfer)."),
                    COMBINE_INPUT, START_INPUT, END_INPUT, SCALING_INPUT, NEGATIVE_INPUT, MASK_INPUT,
                    CLIP_VISION_INPUT, UNFOLD_LATER_INPUT],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, image_style, image_composition, weight_style,
                weight_composition, expand_style, combine_embeds, start_at, end_at, embeds_scaling,
                image_negative=None, attn_mask=None, clip_vision=None, unfold_batch=False) -> io.NodeOutput:
        options = dict(start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling, attn_mask=attn_mask)
        style = "strong style transfer" if expand_style else "style transfer"
        model = apply_adapter(model, ipadapter, clip_vision, image_style, weight_style, combine_embeds,
                              image_negative, unfold_batch, weight_type=style, **options)
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image_composition, weight_composition,
                                           combine_embeds, image_negative, unfold_batch, weight_type="composition",
                                           **options))


class ImagePromptTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptTiled",
            display_name="Apply IP-Adapter Tiled",
            category=CATEGORY,
            description="For a reference that is not square: CLIP vision sees square tiles along its long side, "
                        "and each tile's tokens steer the same share of the generated image.",
            inputs=[*model_inputs(),
                    io.Image.Input("image", tooltip="The reference image(s), of any aspect ratio."),
                    weight_input(), WEIGHT_TYPE_INPUT, COMBINE_INPUT, START_INPUT, END_INPUT,
                    io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="Unsharp-mask amount applied to each tile after resizing."),
                    SCALING_INPUT, NEGATIVE_INPUT, MASK_INPUT, CLIP_VISION_INPUT, UNFOLD_LATER_INPUT],
            outputs=[io.Model.Output(), io.Image.Output(display_name="tiles"), io.Mask.Output(display_name="masks")],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, image, weight, weight_type, combine_embeds, start_at, end_at,
                sharpening, embeds_scaling, image_negative=None, attn_mask=None, clip_vision=None,
                unfold_batch=False) -> io.NodeOutput:
        check_fit(ipadapter.file, cross_attention_layers(model)[0])
        size = ENCODERS[ipadapter.file.variant.encoder]["image_size"]
        crops, masks = prep.tiles(prep.as_rgb(image))
        tiles = torch.stack([prep.prepare(crop, size, "center", "bicubic", sharpening) for crop in crops])
        for tile, mask in zip(tiles, masks):
            mask = mask[None]
            if attn_mask is not None:  # [frames, H, W] on the tile's area
                outer = torch.nn.functional.interpolate(attn_mask.reshape(-1, 1, *attn_mask.shape[-2:]).float(),
                                                        size=mask.shape[-2:], mode="bilinear")
                mask = mask * outer[:, 0]
            model = apply_adapter(model, ipadapter, clip_vision, tile, weight, combine_embeds, image_negative,
                                  unfold_batch, weight_type=weight_type, start_at=start_at, end_at=end_at,
                                  embeds_scaling=embeds_scaling, attn_mask=mask)
        return io.NodeOutput(model, tiles.flatten(0, 1), masks)


def model_base(model) -> str:
    """"sd15" or "sdxl" (Kolors has the SDXL layout) from the model's cross-attention width."""
    layers, _ = cross_attention_layers(model)
    base = {768: "sd15", 2048: "sdxl"}.get(layers[0].context_dim if layers else 0)
    if base is None:
        raise ValueError("model: the unified loaders know SD1.5 (context 768) and SDXL (context 2048) UNets; "
                         "load an adapter file with Load IP-Adapter instead")
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


REUSE_INPUT = Adapter.Input("ipadapter", optional=True,
                            tooltip="An adapter a previous unified loader loaded: reused when it is this preset's, "
                                    "so a chain of loaders reads each file once.")


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
                                           "composition, Kolors plus."),
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


NODES = [ImagePromptUnifiedLoader, ImagePromptAdapterLoader, ImagePromptApply, ImagePromptApplyAdvanced,
         ImagePromptClipVisionEnhancer, ImagePromptApplyEmbeds, ImagePromptStyleComposition, ImagePromptTiled]
