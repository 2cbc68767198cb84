"""SDXL instruction edit: our guider on the host's SDXL InstructPix2Pix model against diffusers'
StableDiffusionXLInstructPix2PixPipeline with the same random weights (the full 2.57 B-parameter SDXL UNet
with 8 input channels, float32; the diffusers twin shares the host's weight tensors, so one copy, ~10 GB).

The same per-step comparison as the SD1.5 test (test_instruct_edit_host.py): the pipeline teacher-forced onto
x_k = z + σ_k·n, our guider replayed on its latents. SDXL's extra conditioning is given on both sides: the
pooled text embedding, and original and target size 64 x 64 with no crop (the host's width / height / crop
keys, diffusers' add_time_ids).
"""
from __future__ import annotations

import pytest
import torch

from support.instruct_edit import STEP_ATOL, host_pipeline, host_sigmas, replay, run_pipeline, vp_units
from support.nodes import run_node

pytestmark = [pytest.mark.host, pytest.mark.heavy]

SIZE = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
SDXL_DIFFUSERS = dict(sample_size=128, in_channels=8, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                      cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)


def shared_twin(model):
    """diffusers' UNet2DConditionModel whose parameters are the host model's tensors (no copy)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    host_sd = model.model.diffusion_model.state_dict()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_DIFFUSERS)
    unet.load_state_dict({k: host_sd[mapping[k]] for k in unet.state_dict()}, strict=True, assign=True)
    return unet.eval()


def test_sdxl_guided_prediction_matches_diffusers_xl_pipeline(host, tmp_path):
    import comfy.sd
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from tools import factory
    from tools.factory import host_models as hm
    path = tmp_path / "sdxl_ip2p_layout.ckpt"
    factory.write_state_dict(hm.sdxl_checkpoint(dict(hm.SDXL_UNET, in_channels=8), seed=10), path)
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    assert type(model.model.model_config).__name__ == "SDXL_instructpix2pix"
    sampling = model.get_model_object("model_sampling")

    g = torch.Generator().manual_seed(20)
    text, null = (torch.randn(1, 77, 2048, generator=g) for _ in range(2))
    text_pooled, null_pooled = (torch.randn(1, 1280, generator=g) for _ in range(2))
    image_latent, noise, clean = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    sigmas = host_sigmas(sampling, steps=2)
    forced = [clean + sigma * noise for sigma in sigmas[:-1]]
    pipe, steps = host_pipeline(StableDiffusionXLInstructPix2PixPipeline, sampling, sigmas, text_encoder=None,
                                text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=shared_twin(model),
                                add_watermarker=False)
    run_pipeline(pipe, sigmas, forced, prompt_embeds=text, negative_prompt_embeds=null,
                 pooled_prompt_embeds=text_pooled, negative_pooled_prompt_embeds=null_pooled, image=image_latent,
                 latents=noise, guidance_scale=7.5, image_guidance_scale=1.5, original_size=(64, 64),
                 target_size=(64, 64))
    inputs = [x for x, _ in steps]
    assert len(steps) == 2

    positive, image_only, negative, *_ = run_node(
        host, "InstructEditConditioning", positive=[[text, {"pooled_output": text_pooled, **SIZE}]],
        negative=[[null, {"pooled_output": null_pooled, **SIZE}]], latent={"samples": image_latent})
    (guider,) = run_node(host, "InstructEditGuider", model=model, positive=positive, image_only=image_only,
                         negative=negative, text_scale=7.5, image_scale=1.5)
    for (_, theirs), ours, sigma in zip(steps, replay(guider, inputs, sigmas), sigmas):
        assert vp_units(ours - theirs, sigma) <= STEP_ATOL
        assert vp_units(theirs, sigma) > 100 * STEP_ATOL
