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

import inspect
from types import SimpleNamespace

import pytest
import torch

from test_ipadapter_parity import TINY_DIFFUSERS, diffusers_twin
from tools.comfy_host import pack_module

pytestmark = pytest.mark.host

EDIT_CKPT, PLAIN_CKPT = "tiny_sd15_ip2p.ckpt", "tiny_sd15.ckpt"
STEP_ATOL = 1e-5  # on the guided prediction in the UNet's variance-preserving units (see vp_units)


def run_node(host, node_id, **inputs):
    return host.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


@pytest.fixture(scope="module")
def edit(host, need_models):
    need_models(f"checkpoints/{EDIT_CKPT}", f"checkpoints/{PLAIN_CKPT}")
    model, clip, vae = host.CheckpointLoaderSimple().load_checkpoint(EDIT_CKPT)
    return SimpleNamespace(model=model, clip=clip, vae=vae, sampling=model.get_model_object("model_sampling"))


def case(seed: int):
    """Random text and null-text embeddings [1, 77, 768], an image latent and a noise [1, 4, 8, 8]."""
    g = torch.Generator().manual_seed(seed)
    text, null = (torch.randn(1, 77, 768, generator=g) for _ in range(2))
    image_latent, noise, clean = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    return SimpleNamespace(text=text, null=null, image_latent=image_latent, noise=noise, clean=clean)


def our_guider(host, model, c, **scales):
    positive, image_only, negative, *_ = run_node(host, "InstructEditConditioning", positive=[[c.text, {}]],
                                                  negative=[[c.null, {}]], latent={"samples": c.image_latent})
    (guider,) = run_node(host, "InstructEditGuider", model=model, positive=positive, image_only=image_only,
                         negative=negative, **scales)
    return guider


def dual_cfg_guider(model, c, text_scale, image_scale):
    import node_helpers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    with_image = {"concat_latent_image": c.image_latent}
    guider = Guider_DualCFG(model)
    guider.set_conds(node_helpers.conditioning_set_values([[c.text, {}]], with_image),
                     node_helpers.conditioning_set_values([[c.null, {}]], with_image), [[c.null, {}]])
    guider.set_cfg(text_scale, image_scale)
    return guider


def host_sigmas(sampling, steps=3):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(sampling, "normal", steps)


def sample(guider, noise, sigmas):
    """Euler from zeros; the result in the model's latent space, as diffusers returns it."""
    import comfy.samplers
    out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                        disable_pbar=True)
    return guider.model_patcher.model.process_latent_in(out)


def replay(guider, inputs, sigmas):
    """The guider's ε at each (x_k, σ_k): a host sampler that evaluates the given latents instead of stepping."""
    import comfy.samplers
    eps = []

    @torch.no_grad()
    def evaluate(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for x_k, sigma in zip(inputs, sigmas[:-1]):
            denoised = model(x_k, sigma * x_k.new_ones(x_k.shape[0]), **extra_args)
            eps.append((x_k - denoised) / sigma)
        return x
    guider.sample(torch.zeros_like(inputs[0]), torch.zeros_like(inputs[0]), comfy.samplers.KSAMPLER(evaluate),
                  sigmas, seed=0, disable_pbar=True)
    return eps


def record_batches(model):
    """A clone of ``model`` whose UNet calls are logged: (cond_or_uncond, input batch, denoised output)."""
    calls, clone = [], model.clone()

    def logging(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((list(args["cond_or_uncond"]), args["input"].shape[0], out))
        return out
    clone.set_model_unet_function_wrapper(logging)
    return clone, calls


def host_pipeline(pipeline_class, sampling, sigmas, **components):
    """A diffusers pipeline of ``pipeline_class`` on the host's σ and timesteps: (pipeline, steps), where steps
    collects (noisy latent, guided ε) at each of its Euler steps."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")  # "leading": initial noise σ = sqrt(σ_max² + 1)

    def host_schedule(num_inference_steps=None, device=None, **_):
        scheduler.sigmas = sigmas.clone()
        scheduler.timesteps = sampling.timestep(sigmas[:-1]).float()  # the host feeds its UNet these t
        scheduler.num_inference_steps = len(sigmas) - 1
        scheduler._step_index = scheduler._begin_index = None
    scheduler.set_timesteps = host_schedule
    steps, step = [], scheduler.step

    def recording_step(model_output, timestep, latents, **kwargs):
        steps.append((latents.clone(), model_output.clone()))
        return step(model_output, timestep, latents, **kwargs)
    scheduler.step = recording_step
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)  # only its config is read
    pipe = pipeline_class(vae=vae, scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, steps


def run_pipeline(pipe, sigmas, forced=None, **inputs) -> torch.Tensor:
    """The final latents of ``pipe`` over ``sigmas``; ``forced`` [x_0, x_1, ...]: the latents to continue from
    after each step (teacher forcing) instead of its own."""
    def next_latents(i: int) -> torch.Tensor | None:
        return forced[i + 1] if forced is not None and i + 1 < len(forced) else None
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def force(pipe, i, t, tensors):
            latents = next_latents(i)
            return {} if latents is None else {"latents": latents}
        inputs["callback_on_step_end"] = force
    else:  # the older interface (SDXL InstructPix2Pix): the callback sees the live latents
        def force_in_place(i, t, latents):
            if (replacement := next_latents(i)) is not None:
                latents.copy_(replacement)
        inputs["callback"] = force_in_place
    with torch.no_grad():
        return pipe(num_inference_steps=len(sigmas) - 1, output_type="latent", **inputs).images


def diffusers_edit(model, sampling, c, sigmas, text_scale, image_scale, forced=None, unet=None, ip_adapter_embeds=None):
    """diffusers' SD1.5 pipeline on the host's σ: (noisy latent and guided ε of each step, final latents), see
    run_pipeline for ``forced``. ``unet``: a diffusers twin to use (e.g. with an IP-Adapter loaded), then given
    ``ip_adapter_embeds``: CLIP outputs [cond; uncond; uncond] as the pipeline takes them (it pairs them with its
    own batch)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    unet = unet or diffusers_twin(model, dict(TINY_DIFFUSERS, in_channels=8))
    pipe, steps = host_pipeline(StableDiffusionInstructPix2PixPipeline, sampling, sigmas, text_encoder=None,
                                tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    adapter_inputs = {}
    if ip_adapter_embeds is not None:
        adapter_inputs["ip_adapter_image_embeds"] = [ip_adapter_embeds]
        # the pipeline orders the embeds as [cond, uncond, uncond] but then, given embeds instead of an image,
        # does not pass them to its UNet (added_cond_kwargs is None): hand the UNet what it prepared
        ordered = pipe.prepare_ip_adapter_image_embeds(None, [ip_adapter_embeds], "cpu", 1, True)
        forward = unet.forward

        def with_image_embeds(*args, added_cond_kwargs=None, **kwargs):
            return forward(*args, added_cond_kwargs={"image_embeds": ordered}, **kwargs)
        unet.forward = with_image_embeds
    final = run_pipeline(pipe, sigmas, forced, prompt_embeds=c.text, negative_prompt_embeds=c.null,
                         image=c.image_latent, latents=c.noise, guidance_scale=text_scale,
                         image_guidance_scale=image_scale, **adapter_inputs)
    return steps, final


def vp_units(eps_difference: torch.Tensor, sigma: torch.Tensor) -> float:
    """max |Δε|·σ/√(1+σ²): a difference of √ᾱ·x0 = √ᾱ·x − √(1−ᾱ)·ε, the guided prediction in the units
    of the UNet's variance-preserving input. The host's guiders combine float32 denoised predictions x − σ·ε,
    which hold ε only to about ulp(|x|)/σ: plain ε would measure that rounding at the smallest σ, plain x0
    at the largest."""
    return float(eps_difference.abs().max() * sigma / (1 + sigma ** 2).sqrt())


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
