"""Per-frame weights for an unfolded batch (animation): one transition between key values, laid out over the
reference images, and the prompt schedule that goes with it.

Timing and method names are those of the most-used pack, so that its animation graphs keep their schedules.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import torch

TIMINGS = ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random")
METHODS = ("full batch", "shift batches", "alternate batches")
# t in 0..1 -> share of the way from the first key value to the last
_CURVES = {"linear": lambda t: t, "ease_in_out": lambda t: (1 - math.cos(math.pi * t)) / 2,
           "ease_in": lambda t: math.sin(math.pi * t / 2), "ease_out": lambda t: 1 - math.cos(math.pi * t / 2)}


def parse_keys(text: str) -> tuple[float, ...]:
    """Key values written as numbers separated by commas or new lines."""
    try:
        return tuple(float(v) for v in text.replace("\n", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"weights: expected numbers separated by commas, got {text!r}") from None


def frame_weights(keys: tuple[float, ...], timing: str, frames: int, start_frame: int, end_frame: int,
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
    if method != "full batch" and count < 2:
        raise ValueError(f"image: the method '{method}' pairs each reference image with another and needs at least "
                         f"2 images; got {count} (one image takes 'full batch')")
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


@dataclass(frozen=True)
class FrameSchedule:
    """What a Frame Weights node was set to (the weights strategy), to lay the same schedule over other
    images or to write the prompt schedule that goes with it. ``images``: how many reference images it had."""
    keys: tuple[float, ...]
    timing: str
    frames: int
    start_frame: int
    end_frame: int
    add_starting_frames: int
    add_ending_frames: int
    method: str
    images: int = 0

    def __post_init__(self):
        if self.timing not in TIMINGS or self.method not in METHODS:
            raise ValueError(f"timing / method: expected one of {', '.join(TIMINGS)} / {', '.join(METHODS)}")

    def transition(self) -> list[float]:
        """One transition's weights (``frame_weights``)."""
        return frame_weights(self.keys, self.timing, self.frames, self.start_frame, self.end_frame)

    def lay_out(self, image: torch.Tensor | None):
        """(weights, image_1, image_2) for the reference images ``image`` [n, H, W, C] (or none): the
        transition arranged by the method, then the starting frames (first value and image) and the ending
        frames (last value and image) added."""
        values, first, second = arrange_frames(self.transition(), image, self.method)
        if image is None:
            return values, None, None

        def pad(images):
            return images if images is None else torch.cat(
                [image[:1].expand(self.add_starting_frames, *image.shape[1:]), images,
                 image[-1:].expand(self.add_ending_frames, *image.shape[1:])])
        values = [values[0]] * self.add_starting_frames + values + [values[-1]] * self.add_ending_frames
        return values, pad(first), pad(second)

    def prompt_schedule(self, text: str) -> str:
        """Keyframed prompts for a batch prompt scheduler, one line ``"frame": "prompt",`` each: one prompt per
        reference image (``text``'s non-empty lines, the last repeated when fewer), prompt i from frame
        ``add_starting_frames + i * T`` (T: one transition's frames), the first prompt also from frame 0 when
        there are starting frames, the last after the images when there are ending frames. Empty without
        prompts or images."""
        prompts = [line for line in text.split("\n") if line.strip()]
        if not prompts or not self.images:
            return ""
        prompts = (prompts + prompts[-1:] * self.images)[:self.images]
        step = len(self.transition())
        keys = [(self.add_starting_frames + i * step, prompt) for i, prompt in enumerate(prompts)]
        if self.add_starting_frames:
            keys.insert(0, (0, prompts[0]))
        if self.add_ending_frames:
            keys.append((self.add_starting_frames + self.images * step, prompts[-1]))
        return "".join(f"{json.dumps(str(frame))}: {json.dumps(prompt, ensure_ascii=False)},\n"
                       for frame, prompt in keys)
