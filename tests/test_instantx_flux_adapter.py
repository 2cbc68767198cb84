"""InstantX's FLUX.1-dev IP-Adapter: its files are recognised, the SigLIP pooled output it reads equals transformers'
``pooler_output`` (the host's CLIP vision loader leaves the pooling head out: it is read from the same file), and the
nodes apply it to the host's Flux models (the transformer-level parity is test_instantx_flux_parity)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ipadapter_core.loader import load_adapter
from support.flux import sample  # the XLabs node tests' Flux sampling
from support.nodes import run_node
from tools import factory
from tools.comfy_host import pack_module
from tools.factory.dit_models import SIGLIP_SO400M, instantx_flux_adapter

SIGLIP = "clip_vision/sigclip_vision_patch14_384.pt"
FILES = (f"diffusion_models/{factory.FLUX_FILE}", SIGLIP, f"ipadapter/{factory.INSTANTX_FLUX_FILE}",
         "clip_vision/clip_vision_l.pt", "ipadapter/flux-ip-adapter.bin")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The adapter at the published depth (19 + 38 blocks of 3072) with a 16-wide MLP, as a weights-only pickle."""
    path = tmp_path_factory.mktemp("instantx") / "FLUX.1-dev-IP-Adapter.bin"
    factory.write_state_dict(instantx_flux_adapter(5, blocks=57, mlp_width=16), path)
    return path


@pytest.mark.unit
def test_the_published_file_is_identified_with_its_encoder(published, tmp_path):
    adapter = load_adapter(published)
    assert (adapter.variant.name, adapter.variant.encoder, adapter.variant.encoder_output, adapter.variant.tokens) == \
        ("instantx_flux", "SigLIP-so400m-384", "pooled", 128)
    assert adapter.layer_widths == (3072,) * 57 and list(adapter.layer_ids) == list(range(57))
    assert adapter.kv_weights("k", "bias") == ()  # no biases, unlike XLabs'
    result = subprocess.run([sys.executable, "-m", "ipadapter_core.inspect", str(published)], capture_output=True,
                            text=True, cwd=factory.comfy_host.REPO_ROOT)
    line = json.loads(result.stdout)
    assert (line["variant"], line["base"], line["encoder_output"], line["encoder_file"]) == \
        ("instantx_flux", "flux", "pooled", "sigclip_vision_patch14_384.safetensors")
    flat = tmp_path / "FLUX.1-dev-IP-Adapter.safetensors"  # the same groups as flat safetensors keys
    factory.write_state_dict(instantx_flux_adapter(5, blocks=57, mlp_width=16), flat)
    assert load_adapter(flat).variant.name == "instantx_flux"


@pytest.fixture(scope="module")
def flux(host, need_models):
    need_models(*FILES)  # here: a module fixture is set up before the function-level model markers
    (model,) = host.UNETLoader().load_unet(factory.FLUX_FILE, "default")
    (siglip,) = host.CLIPVisionLoader().load_clip("sigclip_vision_patch14_384.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=factory.INSTANTX_FLUX_FILE)
    return model, siglip, adapter


def reference(seed=1):
    return torch.rand(1, 384, 384, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.host
def test_the_pooled_output_is_siglips_pooler_output(host, flux):
    """The host's SigLIP last hidden states through the pooling head read from its file: transformers'
    ``pooler_output`` (what InstantX's and DiffSynth's pipelines feed the adapter)."""
    import comfy.clip_vision
    from transformers import SiglipVisionConfig, SiglipVisionModel
    _, siglip, adapter = flux
    image = reference(3)
    ours = pack_module("nodes.ipadapter_encode").encode_images(adapter, siglip, image, "pooled")
    twin = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)).eval()
    weights = torch.load(factory.ensure(SIGLIP) / SIGLIP, weights_only=True)
    twin.load_state_dict({k.removeprefix("vision_model."): v.float() for k, v in weights.items()}, strict=True)
    pixels = comfy.clip_vision.clip_preprocess(image, size=384, mean=[0.5] * 3, std=[0.5] * 3, crop=True).float()
    with torch.no_grad():
        expected = twin(pixel_values=pixels).pooler_output
    assert ours.shape == (1, 1152)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.host
def test_a_siglip_without_its_pooling_head_on_disk_is_named(host, flux, tmp_path):
    import comfy.clip_vision

    _, _, adapter = flux
    weights = torch.load(factory.ensure(SIGLIP) / SIGLIP, weights_only=True)
    weights = {k: v for k, v in weights.items() if ".head." not in k}
    weights["vision_model.post_layernorm.weight"] = weights["vision_model.post_layernorm.weight"] + 1  # another one
    path = tmp_path / "siglip_without_head.pt"
    torch.save(weights, path)
    headless = comfy.clip_vision.load(str(path))
    with pytest.raises(ValueError, match=r"clip_vision: .* reads SigLIP's pooled output, .*no file in "
                                         r"models/clip_vision holds the connected SigLIP with its head"):
        pack_module("nodes.ipadapter_encode").encode_images(adapter, headless, reference(), "pooled")


@pytest.mark.host
def test_apply_samples_with_the_single_pass_and_with_real_cfg_and_beside_xlabs(host, flux):
    model, siglip, adapter = flux
    (patched,) = run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=siglip,
                          image=reference(), weight=1.0)
    options = patched.model_options["transformer_options"]
    module = pack_module("nodes.patch.flux_instantx")
    if module.calls_attention_patches(model.get_model_object("diffusion_model")):  # the host's attention patches
        assert "dit" not in options.get("patches_replace", {}) and "optimized_attention_override" not in options
    else:  # block patches on every block and the attention override
        assert set(options["patches_replace"]["dit"]) == {("double_block", 0), ("double_block", 1),
                                                          ("single_block", 0)}
    (spec,) = module.applied(options, module.InstantXTerms).adapters
    with torch.no_grad():  # the negative side: the projection of zeros, as DiffSynth's pipeline makes it
        torch.testing.assert_close(spec.uncond_tokens, adapter.projection(torch.zeros(1, 1152)), rtol=0, atol=0)
    for cfg in (1.0, 2.5):  # guidance-distilled single pass; true CFG batches the negative too
        plain, steered = sample(host, model, cfg), sample(host, patched, cfg)
        assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-3
    (clip_l,) = host.CLIPVisionLoader().load_clip("clip_vision_l.pt")
    (xlabs,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="flux-ip-adapter.bin")
    (both,) = run_node(host, "ImagePromptApply", model=patched, ipadapter=xlabs, clip_vision=clip_l,
                       image=reference()[:, :224, :224], weight=1.0)  # XLabs' block patch runs inside InstantX's
    alone = sample(host, patched, 1.0)
    assert (sample(host, both, 1.0) - alone).abs().max() > 1e-3


@pytest.mark.host
def test_unified_loader_finds_the_preset_file_and_siglip_and_a_wrong_encoder_is_named(host, flux):
    model, _, _ = flux
    patched_model, loaded, clip_vision = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="FLUX INSTANTX")
    assert loaded.file.name == factory.INSTANTX_FLUX_FILE and loaded.file.variant.name == "instantx_flux"
    assert clip_vision is loaded.clip_vision is not None
    (patched,) = run_node(host, "ImagePromptApply", model=patched_model, ipadapter=loaded, image=reference(),
                          weight=0.7)
    module = pack_module("nodes.patch.flux_instantx")
    assert module.applied(patched.model_options["transformer_options"], module.InstantXTerms) is not None
    (clip_l,) = host.CLIPVisionLoader().load_clip("clip_vision_l.pt")
    with pytest.raises(ValueError, match=r"needs the CLIP vision SigLIP-so400m-384 \(sigclip_vision_patch14_384"
                                         r".safetensors, hidden width 1152, 384 px\); the connected CLIP vision is "
                                         r"ViT-L-14"):
        run_node(host, "ImagePromptApply", model=model, ipadapter=loaded, clip_vision=clip_l, image=reference(),
                 weight=1.0)
