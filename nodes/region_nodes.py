"""Regions: reference images that each steer a masked region (with that region's text prompt)."""
from __future__ import annotations

from dataclasses import replace

import node_helpers
from comfy_api.latest import io

from ..ipadapter_core.apply_options import ApplyOptions
from .ipadapter_apply import apply_adapter
from .ipadapter_encode import LoadedAdapter
from .ipadapter_inputs import (CATEGORY, CLIP_VISION_INPUT, COMBINE_INPUT, END_INPUT, NEGATIVE_INPUT, SCALING_INPUT,
                               START_INPUT, WEIGHT_TYPE_INPUT, model_inputs)
from .patch import model_fit

Params = io.Custom("IMAGE_PROMPT_PARAMS")  # a list of regions: dicts of a reference "image" and its ApplyOptions


class ImagePromptRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptRegion",
            display_name="IP-Adapter Region",
            category=CATEGORY,
            description="One region of a regional composition: a reference image for the masked area, and the "
                        "text conditionings limited to the same mask.",
            inputs=[io.Image.Input("image", tooltip="The reference image for this region."),
                    io.Float.Input("image_weight", default=1.0, min=-1.0, max=3.0, step=0.05,
                                   tooltip="Weight of the reference in this region."),
                    io.Float.Input("prompt_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                                   tooltip="Strength of the text conditionings inside the mask."),
                    WEIGHT_TYPE_INPUT, START_INPUT, END_INPUT,
                    io.Mask.Input("mask", optional=True, tooltip="The region (white); without it, the whole image."),
                    io.Conditioning.Input("positive", optional=True, tooltip="Text for this region."),
                    io.Conditioning.Input("negative", optional=True, tooltip="Negative text for this region.")],
            outputs=[Params.Output(display_name="ipadapter_params"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, image, image_weight, prompt_weight, weight_type, start_at, end_at, mask=None, positive=None,
                negative=None) -> io.NodeOutput:
        if mask is not None:
            if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
                raise ValueError(f"mask: expected one MASK [1, H, W], got shape {tuple(mask.shape)}")
            mask = mask.reshape(1, *mask.shape[-2:])
            values = {"mask": mask, "set_area_to_bounds": False, "mask_strength": prompt_weight}
            positive = positive and node_helpers.conditioning_set_values(positive, values)
            negative = negative and node_helpers.conditioning_set_values(negative, values)
        options = ApplyOptions.from_inputs(image_weight, weight_type=weight_type, start_at=start_at, end_at=end_at,
                                           attn_mask=mask)
        return io.NodeOutput([{"image": image, "options": options}], positive, negative)


class ImagePromptCombineRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptCombineRegions",
            display_name="IP-Adapter Combine Regions",
            category=CATEGORY,
            description="Collects up to five regions for Apply IP-Adapter Regions.",
            inputs=[Params.Input("params_1", tooltip="A region (or a collection)."),
                    Params.Input("params_2", tooltip="Another region."),
                    *[Params.Input(f"params_{i}", optional=True, tooltip="Another region.") for i in range(3, 6)]],
            outputs=[Params.Output(display_name="ipadapter_params")],
        )

    @classmethod
    def execute(cls, params_1, params_2, **more) -> io.NodeOutput:
        return io.NodeOutput([*params_1, *params_2, *(r for _, p in sorted(more.items()) if p for r in p)])


class ImagePromptApplyRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptApplyRegions",
            display_name="Apply IP-Adapter Regions",
            category=CATEGORY,
            description="Applies every region's reference to its mask, all in one patch of the model.",
            inputs=[*model_inputs(), Params.Input("ipadapter_params", tooltip="From IP-Adapter Region(s)."),
                    COMBINE_INPUT, SCALING_INPUT, NEGATIVE_INPUT, CLIP_VISION_INPUT],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, ipadapter_params, combine_embeds, embeds_scaling,
                image_negative=None, clip_vision=None) -> io.NodeOutput:
        fit = model_fit(model, ipadapter.file)
        for region in ipadapter_params:
            options = replace(region["options"], combine_embeds=combine_embeds, embeds_scaling=embeds_scaling,
                              image_negative=image_negative)
            model = apply_adapter(model, ipadapter, clip_vision, region["image"], options, fit)
        return io.NodeOutput(model)


NODES = [ImagePromptRegion, ImagePromptCombineRegions, ImagePromptApplyRegions]
