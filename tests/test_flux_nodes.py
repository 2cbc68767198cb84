"""The IP-Adapter nodes on a Flux model, in the real host: the factory's FLUX.1-dev layout (2 + 1 blocks), the
host's CLIP vision loader with a ViT-L/14, XLabs' adapters; sampling with Flux's single pass and with real CFG."""
from __future__ import annotations

import pytest
import torch

from support.flux import sample
from support.nodes import run_node
from tools import factory

pytestmark = pytest.mark.host
FILES = (f"diffusion_models/{factory.FLUX_FILE}", "clip_vision/clip_vision_l.pt", "ipadapter/flux-ip-adapter.bin",
         "ipadapter/flux-ip-adapter-v2.bin", "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt",
         "checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter_sd15.bin")


@pytest.fixture(scope="module")
def flux(host, need_models):
    need_models(*FILES)  # here: a module fixture is set up before the function-level model markers
    (model,) = host.UNETLoader().load_unet(factory.FLUX_FILE, "default")
    (clip_vision,) = host.CLIPVisionLoader().load_clip("clip_vision_l.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="flux-ip-adapter.bin")
    return model, clip_vision, adapter


def reference(seed=1):
    return torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(seed))


def test_apply_on_flux_samples_with_the_single_pass_and_with_real_cfg(host, flux):
    model, clip_vision, adapter = flux
    (patched,) = run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=clip_vision,
                          image=reference(), weight=1.0)
    assert set(patched.model_options["transformer_options"]["patches_replace"]) == {"dit"}
    (spec,) = next(iter(patched.model_options["transformer_options"]["patches_replace"]["dit"].values())).adapters
    black = clip_vision.encode_image(torch.zeros(1, 224, 224, 3)).image_embeds.float()
    with torch.no_grad():  # the negative side: a black image's encoding, as XLabs' nodes and diffusers make it
        torch.testing.assert_close(spec.uncond_tokens, adapter.projection(black), rtol=0, atol=1e-5)
    for cfg in (1.0, 2.5):  # guidance-distilled single pass; true CFG batches the negative too
        plain, steered = sample(host, model, cfg), sample(host, patched, cfg)
        assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-3


def test_advanced_options_work_on_flux_blocks(host, flux):
    """Weight type curves, per-block weights, start/end and a mask, as on a UNet; block maps say they need a UNet."""
    model, clip_vision, adapter = flux
    mask = torch.zeros(1, 64, 96)
    mask[:, :, :32] = 1.0
    common = dict(model=model, ipadapter=adapter, clip_vision=clip_vision, image=reference(), weight=0.8,
                  start_at=0.2, end_at=0.9, embeds_scaling="V only", combine_embeds="concat")
    (patched,) = run_node(host, "ImagePromptApplyAdvanced", weight_type="ease in", attn_mask=mask, **common)
    (spec,) = next(iter(patched.model_options["transformer_options"]["patches_replace"]["dit"].values())).adapters
    assert spec.layer_weights == pytest.approx((0.8, 0.8 * (0.05 + 0.95 / 2))) and spec.sigma_range is not None
    assert torch.isfinite(sample(host, patched, 1.0)).all()
    (by_block,) = run_node(host, "ImagePromptApplyAdvanced", weight_type="linear", layer_weights="1:0.5", **common)
    (spec,) = next(iter(by_block.model_options["transformer_options"]["patches_replace"]["dit"].values())).adapters
    assert spec.layer_weights == pytest.approx((0.0, 0.4))
    with pytest.raises(ValueError, match=r"weight_type: 'style transfer' addresses the attention blocks of SD1.5"):
        run_node(host, "ImagePromptApplyAdvanced", weight_type="style transfer", **common)


def test_unified_loader_finds_the_flux_preset_file_and_its_clip_vision(host, flux):
    model, _, _ = flux
    patched_model, loaded, clip_vision = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="FLUX XLABS V2")
    assert loaded.file.variant.name == "xlabs-v2_flux" and clip_vision is loaded.clip_vision is not None
    (patched,) = run_node(host, "ImagePromptApply", model=patched_model, ipadapter=loaded, image=reference(),
                          weight=1.0)
    (spec,) = next(iter(patched.model_options["transformer_options"]["patches_replace"]["dit"].values())).adapters
    assert spec.tokens == 16
    with pytest.raises(ValueError, match=r"preset: 'PLUS' has no FLUX IP-Adapter"):
        run_node(host, "ImagePromptUnifiedLoader", model=model, preset="PLUS")


def test_the_wrong_clip_vision_names_the_encoder_flux_needs(host, flux):
    model, _, adapter = flux
    (vit_h,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    with pytest.raises(ValueError, match=r"flux-ip-adapter.bin \(xlabs_flux\) needs the CLIP vision ViT-L-14 "
                                         r"\(clip_vision_l.safetensors, hidden width 1024, 224 px\); the connected "
                                         r"CLIP vision is ViT-H-14"):
        run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=vit_h, image=reference(),
                 weight=1.0)


def test_adapters_for_the_other_model_family_are_refused_by_name(host, flux):
    model, clip_vision, adapter = flux
    (sd15,) = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[:1]
    (unet_adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter_sd15.bin")
    with pytest.raises(ValueError, match=r"tiny_ip-adapter_sd15.bin is a SD15 IP-Adapter \(4 cross-attention layers, "
                                         r"context width 768\) but the model is a Flux transformer \(2 double-stream "
                                         r"blocks, context width 4096\)"):
        run_node(host, "ImagePromptApply", model=model, ipadapter=unet_adapter, clip_vision=clip_vision,
                 image=reference(), weight=1.0)
    with pytest.raises(ValueError, match=r"flux-ip-adapter.bin is a FLUX IP-Adapter \(2 double-stream blocks, context "
                                         r"width 4096\) but the model is an SD1.5 UNet \(4 cross-attention layers"):
        run_node(host, "ImagePromptApply", model=sd15, ipadapter=adapter, clip_vision=clip_vision, image=reference(),
                 weight=1.0)
