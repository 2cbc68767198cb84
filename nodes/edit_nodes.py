"""Instruction-edit (InstructPix2Pix) nodes: the three conditionings, a two-scale guider, a one-node sampler,
and a loader for edit UNets in diffusers' format.

The image latent goes on the conditionings as the host's ``concat_latent_image`` (raw VAE mean, as
VAE Encode gives it); the host's edit model classes then apply their own latent policy (identity for
SD1.5 / SDXL InstructPix2Pix, the VAE scale for CosXL Edit), the same as ``instruct_edit.latent``.
A masked edit or one below denoise 1 starts from that latent; a mask goes on it as the host's
``noise_mask``, so the host's samplers keep the unmasked latent at the input image at every step.
"""
from __future__ import annotations

import inspect
import math
import os

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
import node_helpers
import torch
from comfy_api.latest import io

from ..instruct_edit.diffusers_unet import is_diffusers_unet, to_ldm
from ..instruct_edit.guidance import SCHEDULES, EditGuidance, guide_denoised
from ..instruct_edit.latent import RESOLUTION_POLICIES, apply_resolution_policy, null_image_latent
from ..instruct_edit.mask import edit_mask

CATEGORY = "instruct_edit"
EDIT_CHANNELS = 8  # 4 noisy latent + 4 image latent
OTHER_MODELS = {4: "a text-to-image model", 9: "an inpainting model (4 noisy + 1 mask + 4 image channels)"}
COND_TIPS = {
    "positive": "Instruction and input image: ε(T, I).",
    "image_only": "Negative text and input image: ε(∅, I).",
    "negative": "Negative text and a zero image: ε(∅, ∅).",
}
START_LATENTS = ("empty: full edit", "input image: denoise below 1")
MASK_TIP = ("Where the image may change (1) and where it stays (0): one mask for every image or one per image; a "
            "mask of another size is stretched to the image's size, then cropped like the image. The latent "
            "output then starts from the input image and keeps it outside the mask at every step.")
FEATHER_TIP = "Width in pixels of the mask's soft edge, inside the masked region (outside stays unchanged)."


def check_edit_model(model, subject: str = "model: the connected model's UNet") -> None:
    """Raise ValueError, naming the input (``subject``) and what to load, unless the UNet takes 8 input channels."""
    channels = model.model.model_config.unet_config.get("in_channels")
    if channels != EDIT_CHANNELS:
        kind = OTHER_MODELS.get(channels, "not an edit model")
        raise ValueError(
            f"{subject} takes {channels} input channels ({kind}), but an "
            f"instruction-edit model takes {EDIT_CHANNELS}: the noisy latent and the input image's latent. Load an "
            f"InstructPix2Pix checkpoint instead, e.g. instruct-pix2pix-00-22000.safetensors (SD1.5), "
            f"cosxl_edit.safetensors or the sdxl-instructpix2pix-768 UNet (SDXL).")


def pixel_size(latent: torch.Tensor) -> tuple[int, int]:
    """(H, W) in pixels of a latent [B, C, h, w] of an SD-family VAE (8 pixels per latent)."""
    return 8 * latent.shape[-2], 8 * latent.shape[-1]


def encode_edit_image(vae, image, latent, mask, resolution: str, long_side: int, feather: int):
    """(image latent [B, 4, h, w], noise mask [B, 1, 8h, 8w] or None) from an IMAGE or a LATENT and a MASK."""
    if (image is None) == (latent is None):
        raise ValueError("image / latent: connect exactly one of them: an IMAGE to encode with the vae, "
                         "or a LATENT that is already encoded (VAE Encode)")
    if latent is not None:
        image_latent = latent["samples"]
        pixels_size, resolution = pixel_size(image_latent), RESOLUTION_POLICIES[0]
    elif vae is None:
        raise ValueError("vae: connect the edit model's VAE to encode the image (or give a latent instead)")
    else:
        image_latent = vae.encode(apply_resolution_policy(image[..., :3].float(), resolution, long_side))
        pixels_size = tuple(image.shape[1:3])
    if mask is None:
        return image_latent, None
    noise_mask = edit_mask(mask, pixels_size, resolution, long_side, feather, images=image_latent.shape[0])
    return image_latent, noise_mask.reshape(-1, 1, *noise_mask.shape[-2:])


def edit_conditioning(positive, negative, image_latent: torch.Tensor, start_from_image: bool = False,
                      noise_mask: torch.Tensor | None = None):
    """(text+image, null text+image, null text+zero image) conditionings and the LATENT to sample from:
    zeros for a full edit; the image latent below denoise 1 or with a mask (which it then carries)."""
    with_image = {"concat_latent_image": image_latent}
    latent = {"samples": image_latent if start_from_image or noise_mask is not None else torch.zeros_like(image_latent)}
    if noise_mask is not None:
        latent["noise_mask"] = noise_mask
    return (node_helpers.conditioning_set_values(positive, with_image),
            node_helpers.conditioning_set_values(negative, with_image),
            node_helpers.conditioning_set_values(negative, {"concat_latent_image": null_image_latent(image_latent)}),
            latent)


class EditGuider(comfy.samplers.CFGGuider):
    """Three-way guidance over the conds "positive" ε(T,I), "image" ε(∅,I) and "negative" ε(∅,∅), all three
    in one ``calc_cond_batch`` call (one batched UNet pass); the null branch is skipped where s_I is 1, the image
    branch where s_T = s_I (unless a model patch sets the host's ``disable_cfg1_optimization``)."""

    def __init__(self, model_patcher, guidance: EditGuidance):
        super().__init__(model_patcher)
        self.guidance = guidance
        self.step_sigmas: list[float] | None = None  # this run's σ schedule, read from the device once

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        self.step_sigmas = None if self.guidance.schedule == "constant" else sigmas.tolist()
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)

    def set_conds(self, positive, image_only, negative):
        # "negative" prompt type for the image-only cond too (SDXL refiner-style aesthetic score), as DualCFGGuider
        image_only = node_helpers.conditioning_set_values(image_only, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": positive, "image": image_only, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.guidance.constant:  # no need to read σ back from the device
            text_scale, image_scale = self.guidance.text_scale, self.guidance.image_scale
        else:
            text_scale, image_scale = self.guidance.scales(float(timestep.flatten()[0]), self.step_sigmas)  # one read
        skip = not model_options.get("disable_cfg1_optimization", False)
        null_cond = None if skip and math.isclose(image_scale, 1.0) else self.conds.get("negative")
        image_cond = None if skip and math.isclose(text_scale, image_scale) else self.conds.get("image")
        conds = [null_cond, image_cond, self.conds.get("positive")]
        null, image, text_image = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        return guide_denoised(x, timestep, None if null_cond is None else null, None if image_cond is None else image,
                              text_image, text_scale, image_scale, self.guidance.rescale)


def _scale_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=100.0, step=0.05, round=0.01, tooltip=tooltip)


class InstructEditConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructEditConditioning",
            display_name="Instruct Edit Conditioning",
            category=CATEGORY,
            description="Puts the input image's latent on the conditionings of an instruction-edit model "
                        "(InstructPix2Pix, CosXL Edit) and returns the three conditionings the Instruct Edit "
                        "Guider needs, with an empty latent to sample a full edit from.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The instruction, e.g. 'make it winter'."),
                io.Conditioning.Input("negative", tooltip="The null text: an empty prompt, or a negative prompt."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the image; not needed when a latent is given."),
                io.Image.Input("image", optional=True, tooltip="The image to edit. Connect this or latent."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The image to edit, already encoded (VAE Encode). Connect this or image."),
                io.Combo.Input("resolution", options=list(RESOLUTION_POLICIES), default=RESOLUTION_POLICIES[0],
                               tooltip="How the image is sized before encoding: center-cropped to a multiple of "
                                       "8 (as the host does), or scaled so its long side is about long_side with "
                                       "sides in multiples of 64 (as the InstructPix2Pix code does)."),
                io.Int.Input("long_side", default=512, min=64, max=4096, step=64,
                             tooltip="Target long side in pixels for the 'long side to target' resolution."),
                io.Combo.Input("start_latent", options=list(START_LATENTS), default=START_LATENTS[0], optional=True,
                               tooltip="What the latent output holds: zeros, to sample a full edit from noise "
                                       "(denoise 1), or the input image's latent, for denoise below 1. A mask "
                                       "always gives the input image's latent."),
                io.Mask.Input("mask", optional=True, tooltip=MASK_TIP),
                io.Int.Input("feather", default=16, min=0, max=512, optional=True, tooltip=FEATHER_TIP),
            ],
            outputs=[io.Conditioning.Output(display_name=name, tooltip=tip) for name, tip in COND_TIPS.items()]
                    + [io.Latent.Output(display_name="latent", tooltip="The latent to sample from (see start_latent), "
                                                                      "with the mask as its noise mask."),
                       io.Mask.Output(display_name="mask", tooltip="The feathered mask at the encoded image's size "
                                                                   "(all ones without a mask), e.g. to paste the "
                                                                   "decoded edit onto the input (ImageCompositeMasked).")],
        )

    @classmethod
    def execute(cls, positive, negative, vae=None, image=None, latent=None, resolution=RESOLUTION_POLICIES[0],
                long_side=512, start_latent=START_LATENTS[0], mask=None, feather=16) -> io.NodeOutput:
        image_latent, noise_mask = encode_edit_image(vae, image, latent, mask, resolution, long_side, feather)
        pixel_mask = (noise_mask[:, 0] if noise_mask is not None
                      else torch.ones(image_latent.shape[0], *pixel_size(image_latent)))
        return io.NodeOutput(*edit_conditioning(positive, negative, image_latent, start_latent == START_LATENTS[1],
                                                noise_mask), pixel_mask)


class InstructEditGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructEditGuider",
            display_name="Instruct Edit Guider",
            category=CATEGORY,
            description="Guidance with a text scale and an image scale for SamplerCustomAdvanced: "
                        "ε(∅,∅) + text_scale·[ε(T,I) − ε(∅,I)] + image_scale·[ε(∅,I) − ε(∅,∅)], all three "
                        "predictions in one batched model call.",
            inputs=[
                io.Model.Input("model", tooltip="An instruction-edit model (8 UNet input channels)."),
                *(io.Conditioning.Input(name, tooltip=f"From Instruct Edit Conditioning. {tip}")
                  for name, tip in COND_TIPS.items()),
                _scale_input("text_scale", 7.5, "How strongly the edit follows the instruction."),
                _scale_input("image_scale", 1.5, "How closely the result keeps to the input image; 1 turns the "
                                                 "image term off (plain CFG on the instruction)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant",
                               tooltip="constant: the scales above at every step; linear: from the scales above "
                                       "at the first step to the *_end scales at the last."),
                _scale_input("text_scale_end", 7.5, "text_scale at the last step (linear schedule only)."),
                _scale_input("image_scale_end", 1.5, "image_scale at the last step (linear schedule only)."),
                io.Float.Input("image_guidance_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling where the image term starts; before it, "
                                       "plain CFG on the instruction, one model branch cheaper."),
                io.Float.Input("image_guidance_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling where the image term ends; after it, plain "
                                       "CFG on the instruction."),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale of the whole result toward the spread of ε(T, I) "
                                       "(as diffusers' guidance_rescale); 0 is off, 0.7 is typical."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, image_only, negative, text_scale, image_scale, schedule="constant",
                text_scale_end=7.5, image_scale_end=1.5, image_guidance_start=0.0, image_guidance_end=1.0,
                rescale=0.0) -> io.NodeOutput:
        check_edit_model(model)
        if image_guidance_start > image_guidance_end:
            raise ValueError(f"image_guidance_start ({image_guidance_start}) is after image_guidance_end "
                             f"({image_guidance_end})")
        sampling = model.get_model_object("model_sampling")
        interval = (math.inf if image_guidance_start <= 0 else float(sampling.percent_to_sigma(image_guidance_start)),
                    0.0 if image_guidance_end >= 1 else float(sampling.percent_to_sigma(image_guidance_end)))
        guidance = EditGuidance(text_scale, image_scale, schedule, text_scale_end, image_scale_end, interval, rescale)
        guider = EditGuider(model, guidance)
        guider.set_conds(positive, image_only, negative)
        return io.NodeOutput(guider)


class InstructEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructEditSampler",
            display_name="Instruct Edit Sampler",
            category=CATEGORY,
            description="Edits an image by a written instruction in one node: like KSampler, with a text "
                        "scale and an image scale instead of one cfg.",
            inputs=[
                io.Model.Input("model", tooltip="An instruction-edit model (8 UNet input channels)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the starting noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                _scale_input("text_scale", 7.5, "How strongly the edit follows the instruction."),
                _scale_input("image_scale", 1.5, "How closely the result keeps to the input image."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, tooltip="Sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, tooltip="Noise schedule."),
                io.Conditioning.Input("positive", tooltip="The instruction, e.g. 'make it winter'."),
                io.Conditioning.Input("negative", tooltip="The null text: an empty prompt, or a negative prompt."),
                io.Vae.Input("vae", tooltip="Encodes the image."),
                io.Image.Input("image", tooltip="The image to edit (center-cropped to a multiple of 8)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="1: a full edit from noise; below 1: start from the input image, partly "
                                       "noised, and keep more of it."),
                io.Mask.Input("mask", optional=True, tooltip=MASK_TIP),
                io.Int.Input("feather", default=16, min=0, max=512, optional=True, tooltip=FEATHER_TIP),
            ],
            outputs=[io.Latent.Output(tooltip="The edited image's latent (VAE Decode it).")],
        )

    @classmethod
    def execute(cls, model, seed, steps, text_scale, image_scale, sampler_name, scheduler, positive, negative,
                vae, image, denoise=1.0, mask=None, feather=16) -> io.NodeOutput:
        check_edit_model(model)
        image_latent, noise_mask = encode_edit_image(vae, image, None, mask, RESOLUTION_POLICIES[0], 512, feather)
        *conds, latent = edit_conditioning(positive, negative, image_latent, denoise < 1, noise_mask)
        guider = EditGuider(model, EditGuidance(text_scale, image_scale))
        guider.set_conds(*conds)
        start = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        sigmas = comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise).sigmas
        samples = guider.sample(comfy.sample.prepare_noise(start, seed), start,
                                comfy.samplers.sampler_object(sampler_name), sigmas, denoise_mask=noise_mask,
                                callback=latent_preview.prepare_callback(model, sigmas.shape[-1] - 1),
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return io.NodeOutput({"samples": samples.to(comfy.model_management.intermediate_device())})


class InstructEditModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructEditModelLoader",
            display_name="Load Instruct Edit Model",
            category=CATEGORY,
            description="Loads an instruction-edit UNet from models/diffusion_models: the original layout, or "
                        "diffusers' (a diffusion_pytorch_model.safetensors, e.g. HQ-Edit's SD1.5 UNet), which "
                        "the host's own loader refuses.",
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                                   tooltip="An edit UNet file (8 input channels) in models/diffusion_models; "
                                           "take the CLIP and VAE from the matching SD1.5 checkpoint.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name: str) -> io.NodeOutput:
        model = load_edit_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        check_edit_model(model, f"unet_name: {unet_name}")
        return io.NodeOutput(model)


def load_edit_model(path: str, disable_dynamic: bool = False):
    """The host's ModelPatcher of the edit UNet at ``path`` (either layout). Where the host rebuilds models from
    their loader (``cached_patcher_init``: dynamic VRAM's non-dynamic delegate, a copy per GPU), this function is
    that loader, as the host's own UNet loader registers itself."""
    state_dict = comfy.utils.load_torch_file(path, safe_load=True)
    if is_diffusers_unet(state_dict):
        state_dict = to_ldm(state_dict)
    takes_dynamic = "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
    model = comfy.sd.load_diffusion_model_state_dict(
        state_dict, **({"disable_dynamic": disable_dynamic} if takes_dynamic else {}))
    if model is None:
        raise ValueError(f"unet_name: the host does not recognise {os.path.basename(path)} as a diffusion model")
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = (load_edit_model, (path,))
    return model


NODES = [InstructEditConditioning, InstructEditGuider, InstructEditSampler, InstructEditModelLoader]
