"""Reference-image preparation (pure torch): crops, padding, tiles, sharpening, noise images."""
from __future__ import annotations

import pytest
import torch

from ipadapter_core import prep
from support.images import ramp

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("position, first_col, first_row", [("left", 0, 0), ("center", 20, 0), ("right", 40, 0)])
def test_square_crops_the_short_side_at_the_position(position, first_col, first_row):
    out = prep.square(ramp(60, 100), position)
    assert out.shape == (1, 60, 60, 3)
    assert (out[0, 0, 0, 0].item(), out[0, 0, 0, 1].item()) == (first_col, first_row)


def test_square_on_a_tall_image_crops_rows():
    assert prep.square(ramp(100, 60), "bottom")[0, 0, 0, 1].item() == 40
    assert prep.square(ramp(100, 60), "top")[0, 0, 0, 1].item() == 0


def test_pad_keeps_the_whole_image_on_a_neutral_square():
    image = torch.rand(2, 30, 50, 3)
    out = prep.square(image, "pad")
    assert out.shape == (2, 50, 50, 3)
    assert torch.equal(out[:, 10:40], image)
    assert torch.allclose(out[:, :10], torch.tensor(prep.CLIP_MEAN))


def test_prepare_makes_the_encoder_square_in_rgb_from_grey_and_rgba():
    assert prep.prepare(torch.rand(1, 40, 90, 1), 224).shape == (1, 224, 224, 3)
    rgba = torch.rand(1, 40, 90, 4)
    assert torch.equal(prep.prepare(rgba, 32, "left", "nearest"), prep.prepare(rgba[..., :3], 32, "left", "nearest"))


@pytest.mark.parametrize("bad", [torch.rand(1, 1, 1, 3), torch.rand(3, 64, 64), torch.rand(1, 64, 64, 2)])
def test_prepare_names_the_input_and_the_expected_layout(bad):
    with pytest.raises(ValueError, match=r"image: expected an IMAGE batch \[B, H, W, 3\]"):
        prep.prepare(bad, 224)


def test_sharpening_raises_local_contrast_and_zero_is_identity():
    image = torch.full((1, 16, 16, 3), 0.5)
    image[:, :, 8:] = 0.6
    assert torch.equal(prep.sharpen(image, 0.0), image)
    sharp = prep.sharpen(image, 1.0)
    assert sharp[0, 0, 7, 0] < 0.5 and sharp[0, 0, 8, 0] > 0.6  # overshoot on both sides of the edge
    assert torch.allclose(sharp[0, 0, :5], image[0, 0, :5])     # flat areas unchanged


def test_tiles_cover_a_long_image_and_masks_mark_each_span():
    tiles, masks = prep.tiles(torch.rand(1, 100, 300, 3))
    assert tiles.shape == (3, 1, 100, 100, 3) and masks.shape == (3, 100, 300)
    assert torch.equal(masks.amax(0), torch.ones(100, 300))  # every column is in some tile
    assert [int(m[0].nonzero()[0]) for m in masks] == [0, 100, 200]


def test_a_near_square_image_is_one_tile():
    tiles, masks = prep.tiles(torch.rand(2, 100, 120, 3))
    assert tiles.shape[0] == 1 and masks.shape == (1, 100, 120)


@pytest.mark.parametrize("kind", prep.NOISE_TYPES)
def test_noise_images_are_repeatable_and_strength_zero_keeps_the_image(kind):
    image = torch.rand(1, 32, 32, 3)
    first, again = prep.noise_image(kind, 0.7, 0, image), prep.noise_image(kind, 0.7, 0, image)
    assert torch.equal(first, again) and not torch.equal(first, image)
    assert torch.allclose(prep.noise_image(kind, 0.0, 0, image), image)
    assert prep.noise_image(kind, 1.0, 2, None).shape == (1, 224, 224, 3)
