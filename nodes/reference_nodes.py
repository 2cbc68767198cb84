"""Reference controls: strength, timing and mask for one reference latent of a Kontext / Qwen-Image-Edit edit."""
from __future__ import annotations

import math

from comfy_api.latest import io

from .edit_nodes import CATEGORY
from .patch.reference_tokens import ReferenceSetting, control_reference


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
        if not math.isfinite(strength) or strength < 0:
            raise ValueError(f"strength: expected a number from 0 up, got {strength}")
        if start_at > end_at:
            raise ValueError(f"start_at ({start_at}) is after end_at ({end_at}): the reference would never be read")
        if mask is not None:
            if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
                raise ValueError(f"mask: expected one MASK [1, H, W], got shape {tuple(mask.shape)}")
            if not bool(mask.isfinite().all()):
                raise ValueError("mask: it holds NaN or infinite values")
            mask = mask.reshape(mask.shape[-2:])
        return io.NodeOutput(control_reference(conditioning, reference - 1,
                                               ReferenceSetting(strength, start_at, end_at, mask)))


NODES = [ReferenceLatentControls]
