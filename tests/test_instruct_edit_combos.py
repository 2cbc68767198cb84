"""Instruction edit with the host's other features, against the host's own nodes and diffusers:

- a mask is the host's noise mask (SetLatentNoiseMask + KSampler), the latent outside it stays the input's;
- denoise below 1 starts from the input image's latent, as the host's samplers do;
- a diffusers-format edit UNet (HQ-Edit layout) loads and equals diffusers' UNet2DConditionModel;
- ControlNet applied before the edit conditioning reaches all three conditionings, which still batch in one call;
- this pack's IP-Adapter on an edit model equals diffusers' InstructPix2Pix pipeline with the same adapter;
- the guider reads σ from the device once per step, and not at all when its scales are constant.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from support.diffusers_twins import TINY_DIFFUSERS, diffusers_twin
from support.instruct_edit import (STEP_ATOL, case, diffusers_edit, dual_cfg_guider, edit, host_sigmas,  # noqa: F401
                                   our_guider, record_batches, replay, vp_units)
from support.nodes import run_node
from tools import factory
from tools.comfy_host import pack_module

pytestmark = pytest.mark.host

HQ_EDIT = f"tiny_hq_edit/{factory.HQ_EDIT_FILE}"
CONTROLNET = "tiny_sd15_controlnet.pth"
ADAPTER, CLIP_VISION = "tiny_ip-adapter-plus_sd15.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.pt"


def image_and_mask(seed: int, size=(64, 64)):
    """A random image [1, H, W, 3] and a rectangle mask [1, H, W] over its middle."""
    image = torch.rand(1, *size, 3, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, *size)
    mask[:, size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4] = 1
    return image, mask


def custom_sample(host, guider, latent, steps=3, denoise=1.0, seed=7):
    """The graph RandomNoise + KSamplerSelect + BasicScheduler -> SamplerCustomAdvanced."""
    (noise,) = run_node(host, "RandomNoise", noise_seed=seed)
    (sampler,) = run_node(host, "KSamplerSelect", sampler_name="euler")
    (sigmas,) = run_node(host, "BasicScheduler", model=guider.model_patcher, scheduler="normal", steps=steps,
                         denoise=denoise)
    return run_node(host, "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                    latent_image=latent)[0]["samples"]


def test_a_masked_edit_is_the_hosts_noise_mask_and_keeps_the_latent_outside(host, edit):
    import comfy.utils
    c = case(10)
    image, mask = image_and_mask(10)
    text, null = [[c.text, {}]], [[c.null, {}]]
    pos, neg, _ = run_node(host, "InstructPixToPixConditioning", positive=text, negative=null, vae=edit.vae,
                           pixels=image)
    (encoded,) = host.VAEEncode().encode(edit.vae, image)
    (masked,) = host.SetLatentNoiseMask().set_mask(encoded, mask)
    common = dict(model=edit.model, seed=5, steps=2, text_scale=6.5, sampler_name="euler", scheduler="normal",
                  positive=text, negative=null, vae=edit.vae, image=image, mask=mask)
    for denoise in (1.0, 0.6):
        (native,) = host.KSampler().sample(edit.model, 5, 2, 6.5, "euler", "normal", pos, neg, masked, denoise=denoise)
        (ours,) = run_node(host, "InstructEditSampler", image_scale=1.0, feather=0, denoise=denoise, **common)
        torch.testing.assert_close(ours["samples"], native["samples"], rtol=0, atol=1e-6)

    (feathered,) = run_node(host, "InstructEditSampler", image_scale=1.5, feather=8, **common)
    latent_mask = comfy.utils.reshape_mask(mask, feathered["samples"].shape)  # the host's own resizing
    outside, inside = latent_mask == 0, latent_mask == 1
    assert outside.sum() > 100 and inside.sum() > 10
    torch.testing.assert_close(feathered["samples"][outside], encoded["samples"][outside], rtol=0, atol=1e-5)
    assert (feathered["samples"][inside] - encoded["samples"][inside]).abs().mean() > 0.1


def test_conditioning_node_mask_output_and_latent(host, edit):
    image, mask = image_and_mask(11, (70, 83))  # cropped to 64 x 80
    text = [[torch.zeros(1, 77, 768), {}]]
    *_, latent, out_mask = run_node(host, "InstructEditConditioning", positive=text, negative=text, vae=edit.vae,
                                    image=image, mask=mask, feather=4)
    (encoded,) = host.VAEEncode().encode(edit.vae, image[:, 3:67, 1:81])  # the host's center crop of 70 x 83
    assert torch.equal(latent["samples"], encoded["samples"])  # a mask starts from the image, even for a full edit
    assert out_mask.shape == (1, 64, 80) and torch.equal(latent["noise_mask"][:, 0], out_mask)
    cropped = mask[:, 3:67, 1:81]
    assert not out_mask[cropped == 0].any() and out_mask.max() == 1 and (out_mask[cropped == 1] < 1).any()


def test_denoise_below_one_starts_from_the_image_as_the_hosts_guider_does(host, edit):
    c = case(12)
    image, _ = image_and_mask(12)
    (encoded,) = host.VAEEncode().encode(edit.vae, image)
    positive, image_only, negative, latent, _ = run_node(
        host, "InstructEditConditioning", positive=[[c.text, {}]], negative=[[c.null, {}]], vae=edit.vae,
        image=image, start_latent="input image: denoise below 1")
    assert torch.equal(latent["samples"], encoded["samples"])
    (guider,) = run_node(host, "InstructEditGuider", model=edit.model, positive=positive, image_only=image_only,
                         negative=negative, text_scale=6.0, image_scale=1.8)
    reference = dual_cfg_guider(edit.model, SimpleNamespace(**{**vars(c), "image_latent": encoded["samples"]}), 6.0, 1.8)
    ours = custom_sample(host, guider, latent, denoise=0.5)
    torch.testing.assert_close(ours, custom_sample(host, reference, encoded, denoise=0.5), rtol=0, atol=1e-6)
    full = custom_sample(host, guider, {"samples": torch.zeros_like(encoded["samples"])})
    assert (ours - encoded["samples"]).norm() < 0.5 * (full - encoded["samples"]).norm()


def test_diffusers_format_edit_unet_loads_and_equals_diffusers(host, need_models):
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from tools.factory.edit_models import TINY_SD15_EDIT_DIFFUSERS
    path = need_models(f"diffusion_models/{HQ_EDIT}") / "diffusion_models" / HQ_EDIT
    conversion = pack_module("instruct_edit.diffusers_unet")
    (model,) = run_node(host, "InstructEditModelLoader", unet_name=HQ_EDIT)
    assert type(model.model.model_config).__name__ == "SD15_instructpix2pix"
    weights = load_file(str(path))
    host_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)  # the host's own key map
    assert conversion.ldm_key_map(weights) == {key: host_map[key] for key in weights}
    theirs = UNet2DConditionModel(**TINY_SD15_EDIT_DIFFUSERS)
    theirs.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    g = torch.Generator().manual_seed(13)
    x, context = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([421.0, 17.0])
    expected = theirs.eval()(x, t, encoder_hidden_states=context).sample
    ours = model.model.diffusion_model(x, timesteps=t, context=context)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_edit_loader_registers_itself_for_hosts_that_rebuild_models(host, need_models):
    """Newer hosts rebuild a model from its loader (``cached_patcher_init``) for dynamic VRAM's non-dynamic delegate,
    for conditionings with hooks and for a copy per GPU; a model from Load Instruct Edit Model rebuilds too."""
    import inspect
    need_models(f"diffusion_models/{HQ_EDIT}")
    (model,) = run_node(host, "InstructEditModelLoader", unet_name=HQ_EDIT)
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip("this host does not rebuild models from their loader (no ModelPatcher.clone(force_deepcopy))")
    rebuilt = model.clone(force_deepcopy=True)  # the host's path: cached_patcher_init with disable_dynamic=True
    assert rebuilt.model is not model.model
    assert type(rebuilt.model.model_config).__name__ == "SD15_instructpix2pix"
    ours, theirs = model.model.diffusion_model.state_dict(), rebuilt.model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_edit_loader_refuses_a_text_to_image_unet(host, tmp_path):
    import folder_paths
    from tools.factory.edit_models import TINY_SD15_DIFFUSERS, diffusers_unet
    (tmp_path / "plain").mkdir()
    factory.write_state_dict(diffusers_unet(TINY_SD15_DIFFUSERS, seed=14), tmp_path / "plain" / factory.HQ_EDIT_FILE)
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    with pytest.raises(ValueError, match=r"unet_name: plain/diffusion_pytorch_model\.safetensors takes 4 input "
                                         r"channels \(a text-to-image model\), but an instruction-edit model takes 8"):
        run_node(host, "InstructEditModelLoader", unet_name=f"plain/{factory.HQ_EDIT_FILE}")


def test_controlnet_reaches_all_three_conditionings_in_one_batched_call(host, edit, need_models):
    import comfy.samplers
    import node_helpers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    need_models(f"controlnet/{CONTROLNET}")
    c = case(15)
    (control_net,) = host.ControlNetLoader().load_controlnet(CONTROLNET)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(15))
    text, null = host.ControlNetApplyAdvanced().apply_controlnet([[c.text, {}]], [[c.null, {}]], control_net, hint,
                                                                 0.9, 0.0, 1.0)
    conds = run_node(host, "InstructEditConditioning", positive=text, negative=null, latent={"samples": c.image_latent})
    assert conds[0][0][1]["control"] is conds[1][0][1]["control"] is conds[2][0][1]["control"]
    model, calls = record_batches(edit.model)
    (guider,) = run_node(host, "InstructEditGuider", model=model, positive=conds[0], image_only=conds[1],
                         negative=conds[2], text_scale=6.0, image_scale=1.8)
    sigmas = host_sigmas(edit.sampling)
    euler = comfy.samplers.sampler_object("euler")
    ours = guider.sample(c.noise, torch.zeros_like(c.noise), euler, sigmas, seed=0, disable_pbar=True)
    assert [(sorted(order), batch) for order, batch, _ in calls] == [([0, 1, 2], 3)] * 3
    with_image = {"concat_latent_image": c.image_latent}
    reference = Guider_DualCFG(edit.model)  # the notes' wiring, the third cond with the same control
    reference.set_conds(node_helpers.conditioning_set_values(text, with_image),
                        node_helpers.conditioning_set_values(null, with_image), null)
    reference.set_cfg(6.0, 1.8)
    expected = reference.sample(c.noise, torch.zeros_like(c.noise), euler, sigmas, seed=0, disable_pbar=True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    uncontrolled = our_guider(host, edit.model, c, text_scale=6.0, image_scale=1.8)
    without = uncontrolled.sample(c.noise, torch.zeros_like(c.noise), euler, sigmas, seed=0, disable_pbar=True)
    assert (ours - without).abs().max() > 1e-2  # the control does act


def test_ip_adapter_edit_matches_diffusers_pipeline(host, edit, need_models):
    need_models(f"ipadapter/{ADAPTER}", f"clip_vision/{CLIP_VISION}")
    encode = pack_module("nodes.ipadapter_encode")
    c = case(16)
    (clip_vision,) = host.CLIPVisionLoader().load_clip(CLIP_VISION)
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    reference = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(16))
    (patched,) = run_node(host, "ImagePromptApply", model=edit.model, ipadapter=adapter, clip_vision=clip_vision,
                          image=reference, weight=1.0)
    cond, uncond = encode.reference_embeds(adapter, clip_vision, reference)  # the CLIP outputs the Apply node reads
    twin = diffusers_twin(edit.model, dict(TINY_DIFFUSERS, in_channels=8))
    groups = torch.load(need_models() / "ipadapter" / ADAPTER, weights_only=True)
    twin._load_ip_adapter_weights([{g: {k: v.float() for k, v in sd.items()} for g, sd in groups.items()}])

    sigmas = host_sigmas(edit.sampling)
    forced = [c.clean + sigma * c.noise for sigma in sigmas[:-1]]
    steps, _ = diffusers_edit(edit.model, edit.sampling, c, sigmas, 7.5, 1.5, forced, unet=twin,
                              ip_adapter_embeds=torch.cat([cond, uncond, uncond]).unsqueeze(1))
    inputs = [x for x, _ in steps]
    ours, unpatched = (replay(our_guider(host, model, c, text_scale=7.5, image_scale=1.5), inputs, sigmas)
                       for model in (patched, edit.model))
    for (_, theirs), eps, bare, sigma in zip(steps, ours, unpatched, sigmas):
        assert vp_units(eps - theirs, sigma) <= STEP_ATOL
        assert vp_units(eps - bare, sigma) > 10 * STEP_ATOL  # the adapter moves the guided prediction


def test_the_guider_reads_sigma_once_per_step(host, edit):
    """Host reads (aten::_local_scalar_dense: .item(), float() of a tensor) over a sampling run, beyond those
    of the host's DualCFGGuider on the same conditionings, with a schedule, an interval and rescale on."""
    import comfy.samplers
    c = case(17)
    sigmas = host_sigmas(edit.sampling, steps=3)
    euler = comfy.samplers.sampler_object("euler")

    def host_reads(guider) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            guider.sample(c.noise, torch.zeros_like(c.noise), euler, sigmas, seed=0, disable_pbar=True)
        return sum(e.count for e in profile.key_averages() if e.key == "aten::_local_scalar_dense")
    ours = our_guider(host, edit.model, c, text_scale=7.0, image_scale=1.8, schedule="linear", text_scale_end=4.0,
                      image_scale_end=1.2, image_guidance_end=0.7, rescale=0.5)
    assert host_reads(ours) - host_reads(dual_cfg_guider(edit.model, c, 7.0, 1.8)) <= 3
    # constant scales over the whole schedule (the defaults): nothing to read, so no more than DualCFGGuider
    constant = our_guider(host, edit.model, c, text_scale=7.0, image_scale=1.8)
    assert host_reads(constant) <= host_reads(dual_cfg_guider(edit.model, c, 7.0, 1.8))
