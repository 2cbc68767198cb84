"""Edits on models that read references as tokens (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit): strength, timing and
mask per reference latent, and a guider with a text scale and an image scale."""
from __future__ import annotations

from comfy_api.latest import io

from ..instruct_edit.guidance import EditGuidance
from .edit_nodes import CATEGORY, EditGuider
from .patch.reference_tokens import REFERENCES, ReferenceSetting, control_reference


class ReferenceLatentControls(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReferenceLatentControls",
            display_name="Reference Controls (Kontext, Qwen Edit)",
            category=CATEGORY,
            description="How strongly, when and where the edit reads one reference image of the conditioning, on "
                        "models that take references as tokens (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit). Put it after "
                        "ReferenceLatent or the Qwen-Image-Edit text encoder; chain one per reference. Strength 1, "
                        "the whole range and no mask give the model's own result; strength 0 gives the result "
                        "without that reference.",
            inputs=[io.Conditioning.Input("conditioning", tooltip="Conditioning that holds the reference latents."),
                    io.Int.Input("reference", default=1, min=1, max=16,
                                 tooltip="Which reference: 1 is the first one added to this conditioning "
                                         "(ReferenceLatent nodes in chain order; image1, image2... of the Qwen "
                                         "edit text encoder)."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                                   tooltip="How much the text and the output's image tokens attend to this "
                                           "reference: their attention weights on its tokens are multiplied by "
                                           "this. 0 = the reference is not read at all; above 1 = read more."),
                    io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                                   tooltip="Fraction of the sampling at which the reference starts being read."),
                    io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                                   tooltip="Fraction of the sampling after which the reference is no longer read."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Where in the output the reference is read (white = full strength), "
                                          "stretched to the output's size. Text tokens read it at the strength "
                                          "times the mask's mean. Without a mask: everywhere.")],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, conditioning, reference, strength, start_at, end_at, mask=None) -> io.NodeOutput:
        if start_at > end_at:  # strength and the mask's values are checked with every input (nodes/input_checks)
            raise ValueError(f"start_at ({start_at}) is after end_at ({end_at}): the reference would never be read")
        if mask is not None:
            if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
                raise ValueError(f"mask: expected one MASK [1, H, W], got shape {tuple(mask.shape)}")
            mask = mask.reshape(mask.shape[-2:])
        return io.NodeOutput(control_reference(conditioning, reference - 1,
                                               ReferenceSetting(strength, start_at, end_at, mask)))


class ReferenceGuider(EditGuider):
    """ε(∅) + s_T·[ε(T) − ε(∅)] + s_I·[ε(T,I) − ε(T)] over the conds "negative" ε(∅), "image" ε(T) (the positive
    without its references) and "positive" ε(T,I): the three-way guidance with the roles of text and image
    swapped, so EditGuider's combination and branch skipping serve as they are (s_T = s_I: plain CFG, no ε(T);
    s_T = 1: no ε(∅))."""

    def __init__(self, model_patcher, text_scale: float, image_scale: float):
        super().__init__(model_patcher, EditGuidance(text_scale=image_scale, image_scale=text_scale))

    def set_conds(self, positive, negative):
        without = [[tensor, {k: v for k, v in values.items() if k != REFERENCES}] for tensor, values in positive]
        self.inner_set_conds({"positive": positive, "image": without, "negative": negative})


class ReferenceEditGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReferenceEditGuider",
            display_name="Reference Edit Guider (Kontext, Qwen Edit)",
            category=CATEGORY,
            description="Guidance with a text scale and an image scale for edits whose references are tokens, for "
                        "SamplerCustomAdvanced: negative + text_scale·[positive without its references − negative] "
                        "+ image_scale·[positive − positive without its references]. Equal scales are plain CFG at "
                        "that scale (no extra model call); a text_scale of 1 runs no negative.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 Kontext, FLUX.2 or Qwen-Image-Edit."),
                io.Conditioning.Input("positive", tooltip="The instruction with its reference latents (after "
                                                          "ReferenceLatent or the Qwen-Image-Edit text encoder)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (run only when text_scale is not 1)."),
                io.Float.Input("text_scale", default=1.0, min=0.0, max=100.0, step=0.05, round=0.01,
                               tooltip="How strongly the result follows the instruction (the CFG scale). Leave 1 "
                                       "on guidance-distilled models (FLUX.1 Kontext dev); about 4 for Qwen-Image-Edit."),
                io.Float.Input("image_scale", default=1.0, min=0.0, max=100.0, step=0.05, round=0.01,
                               tooltip="How strongly the result follows the references. Equal to text_scale: "
                                       "plain CFG. Otherwise one more model call per step, with the positive "
                                       "prompt alone (the Qwen text encoder's own view of the images stays in "
                                       "it)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, text_scale, image_scale) -> io.NodeOutput:
        if not any(values.get(REFERENCES) for _, values in positive):
            raise ValueError("positive: it holds no reference latents; connect it through ReferenceLatent or the "
                             "Qwen-Image-Edit text encoder with an image")
        guider = ReferenceGuider(model, text_scale, image_scale)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


NODES = [ReferenceLatentControls, ReferenceEditGuider]
