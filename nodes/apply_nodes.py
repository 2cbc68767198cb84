"""IP-Adapter apply nodes: a model steered by reference images (or their embeds), as one patched clone."""
from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io

from ..ipadapter_core import prep
from ..ipadapter_core.apply_options import ApplyOptions
from ..ipadapter_core.variants import ENCODERS, check_embeds
from .ipadapter_apply import apply_adapter, apply_embeds
from .ipadapter_encode import LoadedAdapter, clip_vision_for, neutral_embeds
from .ipadapter_inputs import (CATEGORY, CLIP_VISION_INPUT, COMBINE_INPUT, END_INPUT, MASK_INPUT, NEGATIVE_INPUT,
                               SCALING_INPUT, START_INPUT, UNFOLD_INPUT, UNFOLD_LATER_INPUT, WEIGHT_TYPE_INPUT, Embeds,
                               advanced_inputs, model_inputs, weight_input)
from .patch import model_fit


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
    def execute(cls, model, ipadapter: LoadedAdapter, image, clip_vision=None, **inputs) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, ApplyOptions.from_inputs(**inputs)))


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
    def execute(cls, model, ipadapter: LoadedAdapter, image, clip_vision=None, **inputs) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, ApplyOptions.from_inputs(**inputs)))


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
    def execute(cls, model, ipadapter: LoadedAdapter, image, enhance_tiles, enhance_ratio, clip_vision=None,
                **inputs) -> io.NodeOutput:
        options = ApplyOptions.from_inputs(**inputs, enhance=(enhance_tiles, enhance_ratio))
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image, options))


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
    def execute(cls, model, ipadapter: LoadedAdapter, pos_embeds, neg_embeds=None, clip_vision=None,
                **inputs) -> io.NodeOutput:
        options = ApplyOptions.from_inputs(**inputs)
        fit = model_fit(model, ipadapter.file)
        check_embeds(ipadapter.file.variant, ipadapter.file.name, tuple(pos_embeds.shape))
        if neg_embeds is None and (clip_vision or ipadapter.clip_vision) is not None:
            neg_embeds = neutral_embeds(ipadapter, clip_vision_for(ipadapter, clip_vision), pos_embeds)
        return io.NodeOutput(apply_embeds(model, ipadapter, pos_embeds, neg_embeds, options, fit))


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
                weight_composition, expand_style, clip_vision=None, **inputs) -> io.NodeOutput:
        style = "strong style transfer" if expand_style else "style transfer"
        fit = model_fit(model, ipadapter.file)
        model = apply_adapter(model, ipadapter, clip_vision, image_style,
                              ApplyOptions.from_inputs(weight_style, weight_type=style, **inputs), fit)
        return io.NodeOutput(apply_adapter(model, ipadapter, clip_vision, image_composition,
                                           ApplyOptions.from_inputs(weight_composition, weight_type="composition",
                                                                    **inputs), fit))


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
    def execute(cls, model, ipadapter: LoadedAdapter, image, sharpening, clip_vision=None, **inputs) -> io.NodeOutput:
        options = ApplyOptions.from_inputs(**inputs)
        fit = model_fit(model, ipadapter.file)
        size = ENCODERS[ipadapter.file.variant.encoder]["image_size"]
        crops, masks = prep.tiles(prep.as_rgb(image))
        tiles = torch.stack([prep.prepare(crop, size, "center", "bicubic", sharpening) for crop in crops])
        for tile, mask in zip(tiles, masks):
            mask = mask[None]
            if options.attn_mask is not None:  # [frames, H, W] on the tile's area
                outer = torch.nn.functional.interpolate(options.attn_mask[:, None], size=mask.shape[-2:],
                                                        mode="bilinear")
                mask = mask * outer[:, 0]
            model = apply_adapter(model, ipadapter, clip_vision, tile, replace(options, attn_mask=mask), fit)
        return io.NodeOutput(model, tiles.flatten(0, 1), masks)


NODES = [ImagePromptApply, ImagePromptApplyAdvanced, ImagePromptClipVisionEnhancer, ImagePromptApplyEmbeds,
         ImagePromptStyleComposition, ImagePromptTiled]
