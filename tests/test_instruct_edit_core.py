"""The pure-torch instruction-edit core: three-way guidance, its schedules, interval and rescale, and the
image-latent and resolution policies. Independent references: the formula written out term by term,
diffusers' own ``rescale_noise_cfg``, and worked examples of the original code's size rule."""
from __future__ import annotations


import pytest
import torch

from instruct_edit.guidance import EditGuidance, guide_denoised, rescale, schedule_progress, scheduled, three_way
from instruct_edit.latent import (RESOLUTION_POLICIES, apply_resolution_policy, conditioning_latent, crop_to_multiple,
                                  fit, null_image_latent, paper_size)
from instruct_edit.mask import edit_mask, feather_inward

pytestmark = pytest.mark.unit


def predictions(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]  # x, null, image, text_image


@pytest.mark.parametrize("text_scale, image_scale", [(7.5, 1.5), (5.0, 1.0), (1.0, 2.0), (0.0, 0.0)])
def test_three_way_is_the_papers_formula(text_scale, image_scale):
    _, null, image, text_image = predictions()
    expected = null + text_scale * (text_image - image) + image_scale * (image - null)
    ours = three_way(null, image, text_image, text_scale, image_scale)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_image_scale_one_is_text_cfg_without_the_null_branch():
    _, null, image, text_image = predictions(1)
    two_way = three_way(None, image, text_image, 6.0, 1.0)
    torch.testing.assert_close(two_way, image + 6.0 * (text_image - image), rtol=0, atol=1e-12)
    torch.testing.assert_close(three_way(null, image, text_image, 6.0, 1.0), two_way, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="image scale 1.5 needs the null"):
        three_way(None, image, text_image, 6.0, 1.5)


def test_equal_scales_are_plain_cfg_without_the_image_branch():
    _, null, image, text_image = predictions(2)
    cfg = three_way(null, None, text_image, 4.0, 4.0)
    torch.testing.assert_close(cfg, null + 4.0 * (text_image - null), rtol=0, atol=1e-12)
    torch.testing.assert_close(three_way(null, image, text_image, 4.0, 4.0), cfg, rtol=0, atol=1e-12)
    assert torch.equal(three_way(None, None, text_image, 1.0, 1.0), text_image)
    with pytest.raises(ValueError, match="text scale 4.0 and image scale 2.0 differ"):
        three_way(null, None, text_image, 4.0, 2.0)


def test_combining_x0_equals_combining_eps():
    """The weights sum to 1, so guiding denoised predictions is guiding ε at the same σ."""
    x, *eps = predictions(2)
    sigma = torch.tensor([3.0, 0.5], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x0 = [x - s * e for e in eps]
    guided_x0 = guide_denoised(x, sigma, *x0, 7.5, 1.5)
    torch.testing.assert_close(guided_x0, x - s * three_way(*eps, 7.5, 1.5), rtol=0, atol=1e-12)


def test_rescale_matches_diffusers_guidance_rescale():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    _, null, image, text_image = predictions(3)
    guided = three_way(null, image, text_image, 7.5, 1.5)
    for factor in (0.0, 0.3, 0.7, 1.0):
        expected = rescale_noise_cfg(guided, text_image, guidance_rescale=factor)
        torch.testing.assert_close(rescale(guided, text_image, factor), expected, rtol=0, atol=1e-12)
    per_sample_std = rescale(guided, text_image, 1.0).std(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample_std, text_image.std(dim=(1, 2, 3)), rtol=0, atol=1e-12)


def test_rescale_of_denoised_predictions_is_done_on_eps():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    x, *eps = predictions(4)
    sigma = torch.tensor([2.0, 0.7], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    guided_eps = rescale_noise_cfg(three_way(*eps, 7.5, 1.5), eps[2], guidance_rescale=0.7)
    ours = guide_denoised(x, sigma, *[x - s * e for e in eps], 7.5, 1.5, rescale_factor=0.7)
    torch.testing.assert_close(ours, x - s * guided_eps, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, guide_denoised(x, sigma, *[x - s * e for e in eps], 7.5, 1.5), atol=1e-3)


def test_schedule_progress_over_steps_and_in_between():
    sigmas = torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0])  # 4 steps
    assert [schedule_progress(float(s), sigmas) for s in sigmas[:-1]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert schedule_progress(2.5, sigmas) == pytest.approx(0.5)  # halfway between steps 1 and 2
    assert schedule_progress(20.0, sigmas) == 0 and schedule_progress(0.1, sigmas) == 1
    assert schedule_progress(5.0, torch.tensor([5.0, 0.0])) == 0  # one step


def test_scheduled_scales():
    assert scheduled(7.5, 2.0, 0.6, "constant") == 7.5
    assert scheduled(1.0, 3.0, 0.25, "linear") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="schedule: 'cosine' is not one of"):
        scheduled(1.0, 3.0, 0.25, "cosine")


def test_edit_guidance_schedule_and_interval():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    linear = EditGuidance(8.0, 2.0, "linear", text_end=4.0, image_end=1.0)
    assert [linear.scales(float(s), sigmas) for s in sigmas[:-1]] == [(8.0, 2.0), (6.0, 1.5), (4.0, 1.0)]
    constant = EditGuidance(8.0, 2.0, text_end=4.0, image_end=1.0)  # end values ignored
    assert constant.scales(1.0, sigmas) == (8.0, 2.0)
    interval = EditGuidance(8.0, 2.0, interval=(6.0, 2.0))  # three-way only for 2 <= sigma <= 6
    assert [interval.scales(float(s), sigmas) for s in sigmas[:-1]] == [(8.0, 1.0), (8.0, 2.0), (8.0, 1.0)]
    with pytest.raises(ValueError, match=r"interval: \(high, low\) = \(1.0, 2.0\) has high below low"):
        EditGuidance(8.0, 2.0, interval=(1.0, 2.0))
    with pytest.raises(ValueError, match="schedule: 'steps' is not one of"):
        EditGuidance(8.0, 2.0, "steps")
    # constant: the guider then skips reading sigma back, so the scales must be the same at every sigma
    assert constant.constant and all(constant.scales(s, sigmas) == (8.0, 2.0) for s in (1e9, 10.0, 0.5, 0.0))
    assert not linear.constant and not interval.constant
    assert not EditGuidance(8.0, 2.0, interval=(float("inf"), 0.5)).constant


def test_conditioning_latent_policy_and_null_image():
    mean = torch.randn(1, 4, 8, 8)
    assert conditioning_latent(mean, "sd15_ip2p", 0.18215) is mean
    assert conditioning_latent(mean, "sdxl_ip2p", 0.13025) is mean
    torch.testing.assert_close(conditioning_latent(mean, "cosxl_edit", 0.13025), mean * 0.13025)
    with pytest.raises(ValueError, match="unknown edit model kind 'sd3'"):
        conditioning_latent(mean, "sd3", 1.0)
    null = null_image_latent(mean)
    assert null.shape == mean.shape and not null.any()


def test_host_resolution_policy_center_crops_to_multiples_of_8():
    image = torch.rand(2, 37, 50, 3)
    cropped = crop_to_multiple(image)
    assert cropped.shape == (2, 32, 48, 3)
    assert torch.equal(cropped, image[:, 2:34, 1:49])  # offset = remainder // 2 on each axis
    assert apply_resolution_policy(image, RESOLUTION_POLICIES[0]).shape == (2, 32, 48, 3)
    with pytest.raises(ValueError, match="smaller than 8 pixels"):
        crop_to_multiple(torch.rand(1, 7, 64, 3))


@pytest.mark.parametrize("height, width, size", [
    (480, 640, (384, 512)),     # 4:3: short side 384, long side 512
    (512, 512, (512, 512)),
    (333, 1000, (192, 576)),    # short side rounds up to 192, the long side follows past 512
    (1170, 1468, (448, 512)),   # portrait-ish photo, downscaled
    (100, 80, (512, 448)),      # upscaled: short side 409.6 -> 448, long side 560 -> 512
    (300, 200, (576, 384)),     # short side 341.3 -> 384, so the long side is 576
])
def test_paper_size_examples(height, width, size):
    assert paper_size(height, width) == size
    assert all(side % 64 == 0 for side in paper_size(height, width))


def test_paper_policy_resizes_and_crops_to_the_paper_size():
    image = torch.rand(1, 480, 640, 3)
    out = apply_resolution_policy(image, RESOLUTION_POLICIES[1], long_side=256)
    assert out.shape == (1, 192, 256, 3) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(fit(image, 480, 640), image, rtol=0, atol=1e-5)  # already that size: unchanged
    wide = fit(torch.rand(1, 64, 128, 3), 64, 64)  # aspect kept: the middle square
    assert wide.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="resolution: 'stretch' is not one of"):
        apply_resolution_policy(image, "stretch")


def test_feather_rises_inside_the_mask_and_leaves_the_outside_at_zero():
    mask = torch.zeros(1, 32, 40)
    mask[:, 8:28, 4:40] = 1  # touches the right border: no ramp there
    feathered = feather_inward(mask, 4)
    assert not feathered[mask == 0].any()
    assert torch.equal(feather_inward(mask, 0), mask)
    row = feathered[0, 18]  # left edge at column 4, right edge on the image border
    torch.testing.assert_close(row[4:10], torch.tensor([0, 0.25, 0.5, 0.75, 1, 1]))
    assert (row[10:] == 1).all()
    column = feathered[0, :, 20]  # top edge at row 8, bottom edge at row 27
    torch.testing.assert_close(column[8:13], torch.tensor([0, 0.25, 0.5, 0.75, 1]))
    torch.testing.assert_close(column[23:28], torch.tensor([1, 0.75, 0.5, 0.25, 0]))
    with pytest.raises(ValueError, match="feather: -1 pixels is negative"):
        feather_inward(mask, -1)


def test_edit_mask_is_sized_like_the_image():
    mask = torch.zeros(24, 36)
    mask[:, 18:] = 1  # the right half of a 24 x 36 mask
    crop = edit_mask(mask, (70, 83), RESOLUTION_POLICIES[0], 512, radius=0)  # resized to 70 x 83, cropped to 64 x 80
    assert crop.shape == (1, 64, 80) and not crop[:, :, :36].any() and (crop[:, :, 42:] == 1).all()
    paper = edit_mask(mask, (70, 83), RESOLUTION_POLICIES[1], 128, radius=0)
    assert paper.shape == (1, 128, 128)  # as the image: 70 x 83 -> 128 x 128
