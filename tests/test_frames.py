"""Frame schedules (ipadapter_core.frames): the prompt schedule a batch prompt scheduler reads, and how it lines
up with the frames the same schedule lays out."""
from __future__ import annotations

import json

import pytest
import torch

from ipadapter_core.frames import METHODS, FrameSchedule, parse_keys

pytestmark = pytest.mark.unit


def read_schedule(text: str) -> dict[int, str]:
    """What a batch prompt scheduler does with the text: braces around it, the last comma dropped, JSON."""
    body = text.strip().rstrip(",")
    return {int(frame): prompt for frame, prompt in json.loads("{" + body + "}").items()}


def numbered(count: int) -> torch.Tensor:
    """``count`` images [count, 2, 2, 3], image i filled with i."""
    return torch.arange(float(count)).reshape(count, 1, 1, 1).expand(count, 2, 2, 3)


def schedule(images: int, **changes) -> FrameSchedule:
    settings = dict(keys=(1.0, 0.0), timing="linear", frames=4, start_frame=0, end_frame=9999,
                    add_starting_frames=0, add_ending_frames=0, method="full batch", images=images)
    return FrameSchedule(**{**settings, **changes})


def test_the_schedule_is_one_line_per_key_as_that_pack_writes_it():
    # 3 images, 4 frames a transition, 2 starting and 1 ending frame: prompts at 0 and 2 (first), 6, 10, and 14
    # (the ending frames, last prompt); two prompt lines, so the second serves the third image too
    text = schedule(3, add_starting_frames=2, add_ending_frames=1).prompt_schedule("a cabin\n\nthe lake\n")
    assert text == '"0": "a cabin",\n"2": "a cabin",\n"6": "the lake",\n"10": "the lake",\n"14": "the lake",\n'


@pytest.mark.parametrize("starting, ending", [(0, 0), (3, 0), (0, 2), (1, 5)])
@pytest.mark.parametrize("timing, frames, keys", [("linear", 4, (1.0, 0.0)), ("ease_in_out", 1, (0.2, 0.9)),
                                                  ("custom", 0, (1.0, 0.5, 0.25))])
def test_prompt_i_starts_where_image_i_starts_in_the_laid_out_frames(starting, ending, timing, frames, keys):
    plan = schedule(3, keys=keys, timing=timing, frames=frames, add_starting_frames=starting,
                    add_ending_frames=ending)
    weights, image_1, _ = plan.lay_out(numbered(3))
    shown = image_1[:, 0, 0, 0].tolist()
    assert len(weights) == len(shown)
    keyframes = read_schedule(plan.prompt_schedule("p0\np1\np2"))
    for i in range(3):
        first_of_image = next(f for f in range(starting, len(shown)) if shown[f] == i)
        assert keyframes[first_of_image] == f"p{i}"
    # the prompt in force at each frame (the latest key at or before it) belongs to that frame's image
    for frame, image in enumerate(shown):
        in_force = keyframes[max(key for key in keyframes if key <= frame)]
        assert in_force == f"p{int(image)}", frame


def test_quotes_and_backslashes_in_a_prompt_survive_the_scheduler():
    prompt = 'a "quoted" sign, a back\\slash and ünïcode'
    assert read_schedule(schedule(1).prompt_schedule(prompt)) == {0: prompt}


def test_no_images_or_no_prompts_give_an_empty_schedule():
    assert schedule(0).prompt_schedule("a cabin") == ""
    assert schedule(2).prompt_schedule(" \n\n") == ""


@pytest.mark.parametrize("method", METHODS)
def test_the_same_schedule_over_other_images_equals_a_new_one_for_them(method):
    """Frame Weights From Strategy: what was set once, laid over another batch."""
    plan = schedule(2, method=method, add_starting_frames=1, add_ending_frames=2)
    other = numbered(5)
    again = schedule(5, method=method, add_starting_frames=1, add_ending_frames=2).lay_out(other)
    weights, image_1, image_2 = plan.lay_out(other)
    assert weights == again[0] and torch.equal(image_1, again[1])
    assert (image_2 is None) == (method == "full batch") and (image_2 is None or torch.equal(image_2, again[2]))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="weights: expected numbers"):
        parse_keys("1, x")
    with pytest.raises(ValueError, match="timing / method"):
        schedule(1, timing="bounce")
