"""The input and type pieces the IP-Adapter nodes share: one definition each, in the order the nodes list them."""
from __future__ import annotations

from comfy_api.latest import io

from ..ipadapter_core.adapter_spec import KV_SCALINGS
from ..ipadapter_core.embeds import COMBINE_MODES
from ..ipadapter_core.weights import WEIGHT_TYPES

CATEGORY = "image_prompt"

Adapter = io.Custom("IMAGE_PROMPT_ADAPTER")
Embeds = io.Custom("EMBEDS")  # CLIP vision outputs (pooled [n, E] or hidden [n, N, E]) or face embeddings [n, 512]


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


REUSE_INPUT = Adapter.Input("ipadapter", optional=True,
                            tooltip="An adapter a previous unified loader loaded: reused when it is this preset's, "
                                    "so a chain of loaders reads each file once.")
