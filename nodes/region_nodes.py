"""Regions and schedules: reference images that each steer a masked region (with that region's text
prompt), and per-frame weights for unfolded batches (animation)."""
from __future__ import annotations

import math
import random

import node_helpers
import torch
from comfy_api.latest import io

from .ipadapter_nodes import (CATEGORY, CLIP_VISION_INPUT, COMBINE_INPUT, END_INPUT, NEGATIVE_INPUT, SCALING_INPUT,
                              START_INPUT, WEIGHT_TYPE_INPUT, LoadedAdapter, apply_adapter, model_inputs)
from .ipadapter_patch import check_fit, cross_attention_layers

Params = io.Custom("IMAGE_PROMPT_PARAMS")  # a list of regions: dicts of image, weight, weight_type, start, end, mask


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
        region = dict(image=image, weight=image_weight, weight_type=weight_type, start_at=start_at, end_at=end_at,
                      attn_mask=mask)
        return io.NodeOutput([region], positive, negative)


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
        check_fit(ipadapter.file, cross_attention_layers(model)[0])
        for region in ipadapter_params:
            region = dict(region)
            model = apply_adapter(model, ipadapter, clip_vision, region.pop("image"), region.pop("weight"),
                                  combine_embeds, image_negative, embeds_scaling=embeds_scaling, **region)
        return io.NodeOutput(model)


TIMINGS = ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random")
METHODS = ("full batch", "shift batches", "alternate batches")
_EASE = {"linear": lambda t: t, "ease_in": lambda t: t * t, "ease_out": lambda t: 1 - (1 - t) ** 2,
         "ease_in_out": lambda t: (1 - math.cos(math.pi * t)) / 2}


def frame_weights(keyframes: list[float], timing: str, frames: int, seed: int = 0) -> list[float]:
    """Per-frame weights: ``custom`` uses the values as given; the curves go from each value to the next in
    ``frames`` frames; ``random`` draws ``frames`` values per step between the smallest and largest value."""
    if timing == "custom" or len(keyframes) < 2 and timing != "random":
        return list(keyframes)
    steps = max(frames, 1)
    if timing == "random":
        rng = random.Random(seed)
        low, high = min(keyframes), max(keyframes)
        return [rng.uniform(low, high) for _ in range(steps * max(len(keyframes) - 1, 1))]
    curve = _EASE[timing]
    out = [a + (b - a) * curve(i / steps) for a, b in zip(keyframes, keyframes[1:]) for i in range(steps)]
    return out + [keyframes[-1]]


class ImagePromptFrameWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptFrameWeights",
            display_name="IP-Adapter Frame Weights",
            category=CATEGORY,
            description="A weight per frame for an unfolded batch (animation): key values joined by curves; link "
                        "'weights' to an apply node's weight with unfold_batch on.",
            inputs=[io.String.Input("weights", default="1.0, 0.0", multiline=True,
                                    tooltip="Key values, separated by commas or new lines."),
                    io.Combo.Input("timing", options=list(TIMINGS), default="linear",
                                   tooltip="custom: one value per frame as written; the curves join the values."),
                    io.Int.Input("frames", default=0, min=0, max=9999,
                                 tooltip="Frames from each key value to the next (curves and random)."),
                    io.Int.Input("start_frame", default=0, min=0, max=9999, tooltip="First frame kept."),
                    io.Int.Input("end_frame", default=9999, min=0, max=9999, tooltip="Frames from here on are cut."),
                    io.Int.Input("add_starting_frames", default=0, min=0, max=9999,
                                 tooltip="Frames holding the first value, added before."),
                    io.Int.Input("add_ending_frames", default=0, min=0, max=9999,
                                 tooltip="Frames holding the last value, added after."),
                    io.Combo.Input("method", options=list(METHODS), default="full batch",
                                   tooltip="How image_1/image_2 are made from the image batch: both the batch; the "
                                           "batch and the batch shifted by one; even and odd images."),
                    io.Image.Input("image", optional=True, tooltip="Frames' reference images.")],
            outputs=[io.Float.Output(display_name="weights"), io.Float.Output(display_name="weights_invert"),
                     io.Int.Output(display_name="total_frames"), io.Image.Output(display_name="image_1"),
                     io.Image.Output(display_name="image_2")],
        )

    @classmethod
    def execute(cls, weights, timing, frames, start_frame, end_frame, add_starting_frames, add_ending_frames,
                method, image=None) -> io.NodeOutput:
        try:
            keyframes = [float(v) for v in weights.replace("\n", ",").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"weights: expected numbers separated by commas, got {weights!r}") from None
        if not keyframes:
            raise ValueError("weights: give at least one value")
        values = frame_weights(keyframes, timing, frames)[start_frame:end_frame]
        if not values:
            raise ValueError(f"start_frame/end_frame: no frames left ({start_frame}..{end_frame})")
        values = [values[0]] * add_starting_frames + values + [values[-1]] * add_ending_frames
        first = second = image
        if image is not None and method == "shift batches":
            second = torch.cat([image[1:], image[-1:]])
        elif image is not None and method == "alternate batches":
            first, second = image[0::2], image[1::2] if image.shape[0] > 1 else image
        return io.NodeOutput(values, [1.0 - v for v in values], len(values), first, second)


NODES = [ImagePromptRegion, ImagePromptCombineRegions, ImagePromptApplyRegions, ImagePromptFrameWeights]
