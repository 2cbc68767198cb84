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
# t in 0..1 -> share of the way from the first key value to the last (the names of the most-used pack,
# so that its graphs keep their schedules).
_CURVES = {"linear": lambda t: t, "ease_in_out": lambda t: (1 - math.cos(math.pi * t)) / 2,
           "ease_in": lambda t: math.sin(math.pi * t / 2), "ease_out": lambda t: 1 - math.cos(math.pi * t / 2)}


def frame_weights(keys: list[float], timing: str, frames: int, start_frame: int, end_frame: int,
                  seed: int = 0) -> list[float]:
    """One transition's weights. ``custom``: the key values as written. Otherwise ``frames`` (at least 2)
    values going from the first key value to the last along the curve between ``start_frame`` and
    ``end_frame``, holding the first value before and the last after; ``random`` draws between them."""
    if timing == "custom":
        return list(keys) or [0.0]
    frames = max(frames, 2)
    first, last = (keys[0], keys[-1]) if keys else (0.0, 1.0)
    stop = min(end_frame, frames)
    span = stop - start_frame
    rng = random.Random(seed)
    values = [first] * start_frame
    for i in range(span):
        t = i / (span - 1) if span > 1 else 1.0
        values.append(rng.uniform(first, last) if timing == "random" else first + (last - first) * _CURVES[timing](t))
    if values and timing != "random":
        values[-1] = last
    values += [last] * (frames - stop)
    return values or [0.0]


def arrange_frames(values: list[float], image: torch.Tensor | None, method: str):
    """(weights, image_1, image_2): the transition repeated for every image (full batch), for every pair of
    neighbours (shift batches: image_1 fades out as image_2 comes in), or for alternating even/odd images
    whose weights swap (their range inverted) every transition. Each image is repeated once per frame."""
    if image is None:
        return values, None, None
    frames, count = len(values), image.shape[0]
    if method == "shift batches":
        return values * (count - 1), image[:-1].repeat_interleave(frames, 0), image[1:].repeat_interleave(frames, 0)
    if method == "alternate batches":
        low, high = min(values), max(values)
        swapped = [high - (w - low) for w in values]
        evens = image[::2].repeat_interleave(2, 0)[1:]
        odds = image[1::2].repeat_interleave(2, 0)
        weights = (values + swapped) * (evens.shape[0] // 2)
        if count % 2:
            evens = evens[:-1]
        else:
            odds = odds[:-1]
            weights = weights + values
        return weights, evens.repeat_interleave(frames, 0), odds.repeat_interleave(frames, 0)
    return values * count, image.repeat_interleave(frames, 0), None


class ImagePromptFrameWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptFrameWeights",
            display_name="IP-Adapter Frame Weights",
            category=CATEGORY,
            description="Weights per frame for an unfolded batch (animation): a transition from the first key value "
                        "to the last over 'frames' frames for every image; link 'weights' and 'image_1' to an apply "
                        "node with unfold_batch on ('image_2' and 'weights_invert' to a second one to cross-fade).",
            inputs=[io.String.Input("weights", default="1.0, 0.0", multiline=True,
                                    tooltip="Key values, separated by commas or new lines."),
                    io.Combo.Input("timing", options=list(TIMINGS), default="linear",
                                   tooltip="custom: one value per frame as written; the curves go from the first value to the last."),
                    io.Int.Input("frames", default=0, min=0, max=9999,
                                 tooltip="Frames of one transition (curves and random; at least 2)."),
                    io.Int.Input("start_frame", default=0, min=0, max=9999, tooltip="Frames before it hold the first value."),
                    io.Int.Input("end_frame", default=9999, min=0, max=9999, tooltip="Frames from here on hold the last value."),
                    io.Int.Input("add_starting_frames", default=0, min=0, max=9999,
                                 tooltip="Frames holding the first value and image, added before."),
                    io.Int.Input("add_ending_frames", default=0, min=0, max=9999,
                                 tooltip="Frames holding the last value and image, added after."),
                    io.Combo.Input("method", options=list(METHODS), default="full batch",
                                   tooltip="full batch: every image gets the transition; shift batches: each image "
                                           "fades into the next (image_1 -> image_2); alternate batches: even and "
                                           "odd images take turns."),
                    io.Image.Input("image", optional=True, tooltip="Frames' reference images.")],
            outputs=[io.Float.Output(display_name="weights"), io.Float.Output(display_name="weights_invert"),
                     io.Int.Output(display_name="total_frames"), io.Image.Output(display_name="image_1"),
                     io.Image.Output(display_name="image_2")],
        )

    @classmethod
    def execute(cls, weights, timing, frames, start_frame, end_frame, add_starting_frames, add_ending_frames,
                method, image=None) -> io.NodeOutput:
        try:
            keys = [float(v) for v in weights.replace("\n", ",").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"weights: expected numbers separated by commas, got {weights!r}") from None
        if timing not in TIMINGS or method not in METHODS:
            raise ValueError(f"timing / method: expected one of {', '.join(TIMINGS)} / {', '.join(METHODS)}")
        values, first, second = arrange_frames(frame_weights(keys, timing, frames, start_frame, end_frame), image,
                                               method)
        if image is not None:
            def pad(images):
                return images if images is None else torch.cat(
                    [image[:1].expand(add_starting_frames, *image.shape[1:]), images,
                     image[-1:].expand(add_ending_frames, *image.shape[1:])])
            first, second = pad(first), pad(second)
            values = [values[0]] * add_starting_frames + values + [values[-1]] * add_ending_frames
        return io.NodeOutput(values, values[::-1], len(values), first, second)


NODES = [ImagePromptRegion, ImagePromptCombineRegions, ImagePromptApplyRegions, ImagePromptFrameWeights]
