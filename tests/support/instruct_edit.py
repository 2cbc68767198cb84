"""The instruction-edit references: the host's edit model, random cases, our guider and the host's DualCFGGuider,
and diffusers' InstructPix2Pix pipelines on the host's σ, compared step by step (vp_units)."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from support.diffusers_twins import TINY_DIFFUSERS, diffusers_twin
from support.nodes import run_node

EDIT_CKPT, PLAIN_CKPT = "tiny_sd15_ip2p.ckpt", "tiny_sd15.ckpt"
STEP_ATOL = 1e-5  # on the guided prediction in the UNet's variance-preserving units (see vp_units)


@pytest.fixture(scope="module")
def edit(host, need_models):
    """The tiny SD1.5 InstructPix2Pix checkpoint loaded by the host: model, clip, vae and its model sampling."""
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
    """Our guider for case ``c``, made by the nodes: Instruct Edit Conditioning, then Instruct Edit Guider."""
    positive, image_only, negative, *_ = run_node(host, "InstructEditConditioning", positive=[[c.text, {}]],
                                                  negative=[[c.null, {}]], latent={"samples": c.image_latent})
    (guider,) = run_node(host, "InstructEditGuider", model=model, positive=positive, image_only=image_only,
                         negative=negative, **scales)
    return guider


def dual_cfg_guider(model, c, text_scale, image_scale):
    """The host's DualCFGGuider in "regular" style: text + image, null text + image, null text without image."""
    import node_helpers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    with_image = {"concat_latent_image": c.image_latent}
    guider = Guider_DualCFG(model)
    guider.set_conds(node_helpers.conditioning_set_values([[c.text, {}]], with_image),
                     node_helpers.conditioning_set_values([[c.null, {}]], with_image), [[c.null, {}]])
    guider.set_cfg(text_scale, image_scale)
    return guider


def host_sigmas(sampling, steps=3):
    """The host's "normal" schedule of ``steps`` steps."""
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(sampling, "normal", steps)


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
