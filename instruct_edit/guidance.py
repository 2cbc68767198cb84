"""Classifier-free guidance with a text scale and an image scale (InstructPix2Pix, arXiv 2211.09800, eq. 3).

    ε̃ = ε(∅,∅) + s_T·[ε(T,I) − ε(∅,I)] + s_I·[ε(∅,I) − ε(∅,∅)]

ε(T,I) is the prediction with the instruction and the input image, ε(∅,I) with the null text and the
image, ε(∅,∅) with the null text and a zero image. The weights (1 − s_I, s_I − s_T, s_T) sum to 1, so the
same combination holds for denoised (x0) predictions: at a fixed σ, x0 = x − σ·ε is affine in ε.
With s_I = 1 the null branch drops out and this is plain text CFG between two image-conditioned
predictions, so the null branch is not evaluated there (outside the guidance interval, for instance).

Predictions are tensors of one shape, e.g. [B, C, H, W]; scales are floats. Nothing here knows ComfyUI.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "linear")


def three_way(null: torch.Tensor | None, image: torch.Tensor | None, text_image: torch.Tensor,
              text_scale: float, image_scale: float) -> torch.Tensor:
    """ε(∅,∅) + s_I·[ε(∅,I) − ε(∅,∅)] + s_T·[ε(T,I) − ε(∅,I)]. ``image`` may be None where s_T = s_I (it
    cancels: plain CFG between ε(T,I) and ε(∅,∅)); ``null`` may be None where s_I = 1."""
    if image is None:
        if not math.isclose(text_scale, image_scale):
            raise ValueError(f"text scale {text_scale} and image scale {image_scale} differ: the image-only "
                             "prediction is needed")
        return text_image if null is None else null + (text_image - null) * text_scale
    if null is None:
        if not math.isclose(image_scale, 1.0):
            raise ValueError(f"image scale {image_scale} needs the null (no text, no image) prediction")
        return image + (text_image - image) * text_scale
    return null + (image - null) * image_scale + (text_image - image) * text_scale


def rescale(guided: torch.Tensor, text_image: torch.Tensor, factor: float) -> torch.Tensor:
    """CFG rescale (Lin et al., arXiv 2305.08891) of the whole three-term result: bring each sample's std
    (over all but the batch dim) to that of ε(T,I), then blend ``factor`` of it into ``guided``. Apply it
    to ε predictions, as diffusers' ``guidance_rescale`` does; 0 returns ``guided`` unchanged."""
    if factor == 0:
        return guided
    matched = guided * (sample_std(text_image) / sample_std(guided))
    return factor * matched + (1 - factor) * guided


def sample_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of each sample of ``x`` [B, ...] over all but the batch dim, [B, 1, ...]. Written out:
    ``Tensor.std`` over several dims reads a scalar back to the host on the CPU."""
    dims = tuple(range(1, x.ndim))
    centered = x - x.mean(dim=dims, keepdim=True)
    return (centered.square().sum(dim=dims, keepdim=True) / (x[0].numel() - 1)).sqrt()


def guide_denoised(x: torch.Tensor, sigma: torch.Tensor, null: torch.Tensor | None, image: torch.Tensor | None,
                   text_image: torch.Tensor, text_scale: float, image_scale: float,
                   rescale_factor: float = 0.0) -> torch.Tensor:
    """The guided x0 from x0 predictions at noisy input ``x`` [B, ...] and ``sigma`` [B]. Without rescale the
    combination is done on x0 directly; with it, on ε = (x − x0) / σ, and the result is turned back into x0."""
    if rescale_factor == 0:
        return three_way(null, image, text_image, text_scale, image_scale)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)

    def to_eps(x0: torch.Tensor) -> torch.Tensor:
        return (x - x0) / s
    eps = three_way(None if null is None else to_eps(null), None if image is None else to_eps(image),
                    to_eps(text_image), text_scale, image_scale)
    return x - rescale(eps, to_eps(text_image), rescale_factor) * s


def schedule_progress(sigma: float, sigmas: Sequence[float]) -> float:
    """Where ``sigma`` lies in a descending schedule ``sigmas`` (N + 1 values), in [0, 1]: 0 at the first of
    the N steps, 1 at the last, linear in σ between steps (for samplers that evaluate in between). Give a
    list of floats on the sampling path: a tensor costs one host read per element."""
    steps = [float(s) for s in sigmas[:-1]]
    if len(steps) < 2 or sigma >= steps[0]:
        return 0.0
    for i in range(len(steps) - 1):
        high, low = steps[i], steps[i + 1]
        if sigma >= low:
            return (i + (high - sigma) / (high - low)) / (len(steps) - 1)
    return 1.0


def scheduled(start: float, end: float, progress: float, schedule: str) -> float:
    """A scale at ``progress`` in [0, 1]: ``start`` throughout ("constant"), or ``start`` to ``end`` ("linear")."""
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    raise ValueError(f"schedule: {schedule!r} is not one of {SCHEDULES}")


@dataclass(frozen=True)
class EditGuidance:
    """s_T and s_I with their schedule, the σ interval (high, low) where the image term applies, and the
    rescale factor. ``text_end`` / ``image_end`` are used by the "linear" schedule only."""
    text_scale: float
    image_scale: float
    schedule: str = "constant"
    text_end: float | None = None
    image_end: float | None = None
    interval: tuple[float, float] = (math.inf, 0.0)
    rescale: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.interval[0] < self.interval[1]:
            raise ValueError(f"interval: (high, low) = {self.interval} has high below low")

    @property
    def constant(self) -> bool:
        """The same (s_T, s_I) at every σ: a constant schedule, and an interval that holds every σ ≥ 0."""
        return self.schedule == "constant" and self.interval[0] == math.inf and self.interval[1] <= 0

    def scales(self, sigma: float, sigmas: Sequence[float] | None) -> tuple[float, float]:
        """(s_T, s_I) at ``sigma`` of the schedule ``sigmas``; s_I is 1 outside the interval."""
        progress = 0.0 if sigmas is None or self.schedule == "constant" else schedule_progress(sigma, sigmas)

        def at(start: float, end: float | None) -> float:
            return scheduled(start, start if end is None else end, progress, self.schedule)
        high, low = self.interval
        image = at(self.image_scale, self.image_end) if low <= sigma <= high else 1.0
        return at(self.text_scale, self.text_end), image
