"""Schedules for unfolded batches (animation): weights per frame, the same schedule over other images, the prompt
schedule that goes with it, and joined weight lists."""
from __future__ import annotations

from comfy_api.latest import io

from ..ipadapter_core.frames import METHODS, TIMINGS, FrameSchedule, parse_keys
from .ipadapter_inputs import CATEGORY, weight_input

Strategy = io.Custom("IMAGE_PROMPT_WEIGHTS_STRATEGY")  # a FrameSchedule: what a Frame Weights node was set to

FRAME_OUTPUTS = [io.Float.Output(display_name="weights"), io.Float.Output(display_name="weights_invert"),
                 io.Int.Output(display_name="total_frames"), io.Image.Output(display_name="image_1"),
                 io.Image.Output(display_name="image_2"), Strategy.Output(display_name="weights_strategy")]
IMAGE_INPUT = io.Image.Input("image", optional=True, tooltip="Frames' reference images.")


def frame_outputs(schedule: FrameSchedule, image) -> io.NodeOutput:
    weights, first, second = schedule.lay_out(image)
    return io.NodeOutput(weights, weights[::-1], len(weights), first, second, schedule)


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
                    IMAGE_INPUT],
            outputs=FRAME_OUTPUTS,
        )

    @classmethod
    def execute(cls, weights, timing, frames, start_frame, end_frame, add_starting_frames, add_ending_frames,
                method, image=None) -> io.NodeOutput:
        schedule = FrameSchedule(parse_keys(weights), timing, frames, start_frame, end_frame, add_starting_frames,
                                 add_ending_frames, method, 0 if image is None else image.shape[0])
        return frame_outputs(schedule, image)


class ImagePromptFrameWeightsFromStrategy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptFrameWeightsFromStrategy",
            display_name="IP-Adapter Frame Weights From Strategy",
            category=CATEGORY,
            description="The schedule of a Frame Weights node laid over other reference images.",
            inputs=[Strategy.Input("weights_strategy", tooltip="From IP-Adapter Frame Weights."), IMAGE_INPUT],
            outputs=FRAME_OUTPUTS,
        )

    @classmethod
    def execute(cls, weights_strategy: FrameSchedule, image=None) -> io.NodeOutput:
        return frame_outputs(weights_strategy, image)


class ImagePromptScheduleFromStrategy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptScheduleFromStrategy",
            display_name="IP-Adapter Prompt Schedule From Strategy",
            category=CATEGORY,
            description="Keyframed prompts that follow a Frame Weights schedule, one per reference image, as text for "
                        "a batch prompt scheduler (lines '\"frame\": \"prompt\",').",
            inputs=[Strategy.Input("weights_strategy", tooltip="From IP-Adapter Frame Weights (given images)."),
                    io.String.Input("prompt", default="", multiline=True,
                                    tooltip="One prompt per line, for the reference images in order; the last "
                                            "line is repeated for the images after it.")],
            outputs=[io.String.Output(display_name="prompt_schedule")],
        )

    @classmethod
    def execute(cls, weights_strategy: FrameSchedule, prompt) -> io.NodeOutput:
        return io.NodeOutput(weights_strategy.prompt_schedule(prompt))


class ImagePromptCombineWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptCombineWeights",
            display_name="IP-Adapter Combine Weights",
            category=CATEGORY,
            description="Two weights or lists of frame weights joined into one list (the first, then the second).",
            inputs=[weight_input("weights_1", "A weight, or a list of weights from Frame Weights."),
                    weight_input("weights_2", "A weight, or a list of weights, to follow the first.")],
            outputs=[io.Float.Output(display_name="weights"), io.Int.Output(display_name="count")],
        )

    @classmethod
    def execute(cls, weights_1, weights_2) -> io.NodeOutput:
        weights = [w for part in (weights_1, weights_2) for w in (part if isinstance(part, list) else [part])]
        return io.NodeOutput(weights, len(weights))


NODES = [ImagePromptFrameWeights, ImagePromptFrameWeightsFromStrategy, ImagePromptScheduleFromStrategy,
         ImagePromptCombineWeights]
