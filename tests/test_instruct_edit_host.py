"""The instruction-edit nodes inside the real host, against two independent references.

1. diffusers' StableDiffusionInstructPix2PixPipeline (written by others) with the same random weights: the
   host's tiny SD1.5 edit UNet mapped onto a diffusers UNet2DConditionModel with the host's own LDM->diffusers
   key map, the text embeddings passed as prompt_embeds / negative_prompt_embeds, the image as a 4-channel
   latent (the pipeline takes that as latents), and its Euler scheduler on the host's σ and timesteps.
2. The host's DualCFGGuider in "regular" style, wired as the reference notes give it: cond1 = text + image,
   cond2 = null text + image, negative = null text without image.

Per step, our guider is evaluated on the reference's own noisy latents (a replay sampler), so the comparison
is of the guided prediction alone. For that comparison the pipeline is teacher-forced onto latents of a
realistic size, x_k = z + σ_k·n with a clean latent z ~ N(0, 1): the random UNet barely denoises, so its own
trajectory keeps |x| ≈ 50 down to σ = 0.03, where no float32 denoised prediction resolves ε. The final
latents come from each side's own free trajectory.
"""
from __future__ import annotations

import pytest
import torch

from support.instruct_edit import (PLAIN_CKPT, STEP_ATOL, case, diffusers_edit, dual_cfg_guider,
                                   edit,  # noqa: F401 (a fixture)
                                   host_sigmas, our_guider, record_batches, replay, vp_units)
from support.nodes import run_node
from tools.comfy_host import pack_module

pytestmark = pytest.mark.host


def sample(guider, noise, sigmas):
    """Euler from zeros; the result in the model's latent space, as diffusers returns it."""
    import comfy.samplers
    out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                        disable_pbar=True)
    return guider.model_patcher.model.process_latent_in(out)


def test_guided_prediction_matches_diffusers_pipeline(host, edit):
    text_scale, image_scale = 7.5, 1.5
    c = case(0)
    sigmas = host_sigmas(edit.sampling)
    forced = [c.clean + sigma * c.noise for sigma in sigmas[:-1]]
    steps, _ = diffusers_edit(edit.model, edit.sampling, c, sigmas, text_scale, image_scale, forced)
    inputs = [x for x, _ in steps]
    assert len(steps) == 3 and all(torch.equal(a, b) for a, b in zip(inputs[1:], forced[1:]))
    model, calls = record_batches(edit.model)
    guider = our_guider(host, model, c, text_scale=text_scale, image_scale=image_scale)
    for (_, theirs), ours, sigma in zip(steps, replay(guider, inputs, sigmas), sigmas):
        assert vp_units(ours - theirs, sigma) <= STEP_ATOL
    for (order, _, out), sigma in zip(calls, sigmas):  # each guidance term alone is well above the tolerance
        null, image, text_image = (dict(zip(order, out.chunk(3)))[i] for i in range(3))  # denoised x0
        assert vp_units((image_scale - 1) * (image - null) / sigma, sigma) > 10 * STEP_ATOL
        assert vp_units(text_scale * (text_image - image) / sigma, sigma) > 10 * STEP_ATOL
    _, theirs_final = diffusers_edit(edit.model, edit.sampling, c, sigmas, text_scale, image_scale)
    torch.testing.assert_close(sample(guider, c.noise, sigmas), theirs_final, rtol=0, atol=1e-4)


def test_guider_equals_host_dual_cfg_regular(host, edit):
    c = case(1)
    sigmas = host_sigmas(edit.sampling)
    guider = our_guider(host, edit.model, c, text_scale=6.0, image_scale=1.8)
    reference = dual_cfg_guider(edit.model, c, 6.0, 1.8)
    torch.testing.assert_close(sample(guider, c.noise, sigmas), sample(reference, c.noise, sigmas), rtol=0, atol=1e-6)


def test_image_scale_one_is_the_hosts_plain_ksampler(host, edit):
    """s_I = 1 is host-native IP2P: KSampler with cfg = s_T and both conds from InstructPixToPixConditioning."""
    c = case(2)
    image = torch.rand(1, 64, 72, 3, generator=torch.Generator().manual_seed(2))
    text, null = [[c.text, {}]], [[c.null, {}]]
    pos, neg, latent = run_node(host, "InstructPixToPixConditioning", positive=text, negative=null, vae=edit.vae,
                                pixels=image)
    (native,) = host.KSampler().sample(edit.model, 5, 2, 6.5, "euler", "normal", pos, neg, latent)
    common = dict(model=edit.model, seed=5, steps=2, text_scale=6.5, sampler_name="euler", scheduler="normal",
                  positive=text, negative=null, vae=edit.vae, image=image)
    (ours,) = run_node(host, "InstructEditSampler", image_scale=1.0, **common)
    torch.testing.assert_close(ours["samples"], native["samples"], rtol=0, atol=1e-6)
    (guided,) = run_node(host, "InstructEditSampler", image_scale=1.5, **common)
    assert (guided["samples"] - native["samples"]).abs().max() > 1e-3  # the image term does act


def test_schedule_interval_and_rescale_in_one_batched_call_per_step(host, edit):
    guidance = pack_module("instruct_edit.guidance")
    c = case(3)
    sigmas = host_sigmas(edit.sampling)
    low = edit.sampling.percent_to_sigma(0.6)
    assert sigmas[1] > low > sigmas[2]  # the interval [0, 0.6] covers steps 0 and 1, not step 2
    model, calls = record_batches(edit.model)
    guider = our_guider(host, model, c, text_scale=8.0, image_scale=2.0, schedule="linear", text_scale_end=4.0,
                        image_scale_end=1.2, image_guidance_start=0.0, image_guidance_end=0.6, rescale=0.7)
    inputs = [c.noise * s for s in sigmas[:-1]]
    eps = replay(guider, inputs, sigmas)
    assert [(sorted(order), batch) for order, batch, _ in calls] == [([0, 1, 2], 3), ([0, 1, 2], 3), ([1, 2], 2)]
    expected_scales = [(8.0, 2.0), (6.0, 1.6), (4.0, 1.0)]  # linear over the 3 steps; s_I = 1 outside the interval
    for x, sigma, (order, _, out), scales, ours in zip(inputs, sigmas, calls, expected_scales, eps):
        branches = dict(zip(order, out.chunk(len(order))))  # 0 = null, 1 = image only, 2 = text + image
        denoised = guidance.guide_denoised(x, sigma.reshape(1), branches.get(0), branches[1], branches[2],
                                           *scales, rescale_factor=0.7)
        torch.testing.assert_close(ours, (x - denoised) / sigma, rtol=0, atol=1e-6)


def test_conditioning_node_encodes_like_the_hosts_ip2p_node(host, edit):
    image = torch.rand(1, 70, 83, 3, generator=torch.Generator().manual_seed(4))  # cropped to 64 x 80 by both
    text, null = [[torch.randn(1, 77, 768), {}]], [[torch.randn(1, 77, 768), {}]]
    host_pos, host_neg, host_latent = run_node(host, "InstructPixToPixConditioning", positive=text, negative=null,
                                               vae=edit.vae, pixels=image)
    pos, image_only, neg, latent, mask = run_node(host, "InstructEditConditioning", positive=text, negative=null,
                                                  vae=edit.vae, image=image)
    expected = host_pos[0][1]["concat_latent_image"]
    assert expected.shape == (1, 4, 8, 10)
    assert torch.equal(pos[0][1]["concat_latent_image"], expected)
    assert torch.equal(image_only[0][1]["concat_latent_image"], host_neg[0][1]["concat_latent_image"])
    assert image_only[0][0] is null[0][0] and neg[0][0] is null[0][0] and pos[0][0] is text[0][0]
    assert not neg[0][1]["concat_latent_image"].any() and neg[0][1]["concat_latent_image"].shape == expected.shape
    assert torch.equal(latent["samples"], host_latent["samples"]) and "noise_mask" not in latent
    assert torch.equal(mask, torch.ones(1, 64, 80))  # no mask: the whole image may change
    assert "concat_latent_image" not in text[0][1] and "concat_latent_image" not in null[0][1]  # inputs untouched
    paper = run_node(host, "InstructEditConditioning", positive=text, negative=null, vae=edit.vae, image=image,
                     resolution="long side to target, multiples of 64", long_side=128)
    assert paper[0][0][1]["concat_latent_image"].shape == (1, 4, 16, 16)  # 70 x 83 -> 128 x 128
    # a host that keeps images in float16 (newer hosts' --fp16-intermediates) gets the float result
    half = run_node(host, "InstructEditConditioning", positive=text, negative=null, vae=edit.vae, image=image.half(),
                    resolution="long side to target, multiples of 64", long_side=128)
    torch.testing.assert_close(half[0][0][1]["concat_latent_image"],
                               run_node(host, "InstructEditConditioning", positive=text, negative=null, vae=edit.vae,
                                        image=image.half().float(), resolution="long side to target, multiples of 64",
                                        long_side=128)[0][0][1]["concat_latent_image"])


def test_conditioning_node_wants_exactly_one_image_source(host, edit):
    text = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="image / latent: connect exactly one of them"):
        run_node(host, "InstructEditConditioning", positive=text, negative=text, vae=edit.vae)
    with pytest.raises(ValueError, match="image / latent: connect exactly one of them"):
        run_node(host, "InstructEditConditioning", positive=text, negative=text, vae=edit.vae,
                 image=torch.rand(1, 64, 64, 3), latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="vae: connect the edit model's VAE"):
        run_node(host, "InstructEditConditioning", positive=text, negative=text, image=torch.rand(1, 64, 64, 3))


NOT_AN_EDIT_MODEL = (r"model: the connected model's UNet takes 4 input channels \(a text-to-image model\), but an "
                     r"instruction-edit model takes 8: .* Load an InstructPix2Pix checkpoint instead, e\.g\. "
                     r"instruct-pix2pix-00-22000\.safetensors \(SD1\.5\)")


def test_a_text_to_image_model_is_refused_with_what_to_load(host, edit):
    plain = host.CheckpointLoaderSimple().load_checkpoint(PLAIN_CKPT)[0]
    text = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match=NOT_AN_EDIT_MODEL):
        run_node(host, "InstructEditGuider", model=plain, positive=text, image_only=text, negative=text,
                 text_scale=7.5, image_scale=1.5)
    with pytest.raises(ValueError, match=NOT_AN_EDIT_MODEL):
        run_node(host, "InstructEditSampler", model=plain, seed=0, steps=1, text_scale=7.5, image_scale=1.5,
                 sampler_name="euler", scheduler="normal", positive=text, negative=text, vae=edit.vae,
                 image=torch.rand(1, 64, 64, 3))


def test_latent_policy_matches_the_hosts_edit_models(host, edit):
    """SD1.5 IP2P reads the raw mean (the host model's own image processing is the identity); CosXL Edit the
    SDXL-scaled one (the host applies its SDXL latent format)."""
    import comfy.latent_formats
    latent = pack_module("instruct_edit.latent")
    mean = torch.randn(1, 4, 8, 8)
    sd15 = edit.model.model.process_ip2p_image_in(mean)
    assert torch.equal(latent.conditioning_latent(mean, "sd15_ip2p", 0.18215), sd15)
    sdxl = comfy.latent_formats.SDXL()
    assert torch.equal(latent.conditioning_latent(mean, "cosxl_edit", sdxl.scale_factor), sdxl.process_in(mean))
