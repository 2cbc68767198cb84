"""InstantX's SD3.5-Large IP-Adapter: its files are recognised, their time-conditioned resampler equals diffusers'
IPAdapterTimeImageProjection (diffusers' own converter loads the published keys), and the nodes apply it to the
host's SD3 models (the transformer-level parity is test_sd35_parity)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ipadapter_core.loader import load_adapter
from ipadapter_core.projection import build_projection
from support.nodes import run_node
from tools import factory
from tools.factory.dit_models import SD35_RESAMPLER, instantx_sd35_adapter, sd3_transformer


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The adapter at the published size (38 joint blocks of 2432), as a weights-only pickle."""
    path = tmp_path_factory.mktemp("sd35") / "ip-adapter.bin"
    factory.write_state_dict(instantx_sd35_adapter(5, blocks=38), path)
    return path


@pytest.mark.unit
def test_the_published_file_is_identified_with_its_encoder(published):
    adapter = load_adapter(published)
    assert (adapter.variant.name, adapter.variant.encoder, adapter.variant.tokens) == \
        ("instantx_sd35", "SigLIP-so400m-384", 64)
    assert adapter.layer_widths == (2432,) * 38 and list(adapter.layer_ids) == list(range(38))
    result = subprocess.run([sys.executable, "-m", "ipadapter_core.inspect", str(published)], capture_output=True,
                            text=True, cwd=factory.comfy_host.REPO_ROOT)
    line = json.loads(result.stdout)
    assert (line["variant"], line["base"], line["encoder_output"], line["encoder_file"]) == \
        ("instantx_sd35", "sd35", "penultimate", "sigclip_vision_patch14_384.safetensors")


@pytest.mark.unit
def test_the_resampler_equals_diffusers_at_every_timestep(published):
    """The resampler's output and time embedding, at the start, middle and end of a schedule (t 0..1000)."""
    from diffusers.loaders.transformer_sd3 import SD3Transformer2DLoadersMixin
    adapter = load_adapter(published)
    ours = build_projection(adapter.variant, adapter.image_proj)
    image_proj = {k: v.float() for k, v in adapter.image_proj.items()}
    theirs = SD3Transformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        SimpleNamespace(), image_proj, low_cpu_mem_usage=False).eval()
    hidden = torch.randn(2, 729, SD35_RESAMPLER["embed_dim"], generator=torch.Generator().manual_seed(0))
    outputs = []
    with torch.no_grad():
        for t in (1000.0, 520.0, 37.0, 1.0):
            tokens, temb = ours(hidden, torch.full((2,), t))
            expected_tokens, expected_temb = theirs(hidden, torch.full((2,), t))
            torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=1e-5)
            torch.testing.assert_close(temb, expected_temb, rtol=0, atol=1e-5)
            outputs.append(tokens)
    assert (outputs[0] - outputs[-1]).abs().max() > 1e-2  # the timestep really conditions the tokens


def sd3_model():
    """An SD3-family MMDiT of 2 joint blocks (width 128), as the host loads it."""
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(sd3_transformer(2, 7))


@pytest.mark.host
def test_apply_embeds_on_an_sd3_model_samples_with_cfg(host, tmp_path):
    """The adapter at this model's width through Load IP-Adapter and Apply IP-Adapter Embeds (SigLIP hidden states,
    the negative side zeros), sampled by the host's KSampler with CFG; start/end and per-block weights apply."""
    from tools.comfy_host import pack_module
    model = sd3_model()
    assert type(model.model).__name__ == "SD3"  # what the host detects
    path = tmp_path / "ip-adapter_sd35_reduced.bin"
    factory.write_state_dict(instantx_sd35_adapter(6, blocks=2, hidden=128), path)
    adapter = pack_module("nodes.ipadapter_encode").load(str(path))
    assert adapter.file.variant.name == "instantx_sd35" and adapter.file.layer_widths == (128, 128)
    embeds = torch.randn(1, 729, 1152, generator=torch.Generator().manual_seed(1))
    (patched,) = run_node(host, "ImagePromptApplyEmbeds", model=model, ipadapter=adapter, pos_embeds=embeds,
                          weight=0.9, weight_type="linear", start_at=0.1, end_at=0.9, embeds_scaling="V only")
    patch = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)]
    (spec,) = patch.prompt.adapters
    assert spec.layer_weights == (0.9, 0.9) and spec.sigma_range is not None and not spec.uncond_embeds.any()

    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    negative = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    sample = lambda m: host.KSampler().sample(m, 3, 3, 4.0, "euler", "simple", positive, negative, latent)[0]["samples"]
    plain, steered = sample(model), sample(patched)
    assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-3

    (by_block,) = run_node(host, "ImagePromptApplyEmbeds", model=model, ipadapter=adapter, pos_embeds=embeds,
                           weight=0.5, weight_type="ease out", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    (spec,) = by_block.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].prompt.adapters
    assert spec.layer_weights == pytest.approx((0.5 * 0.05, 0.5 * (0.05 + 0.95 / 2)))


@pytest.mark.host
def test_a_mask_and_unfolded_images_with_weights_sample_through_the_nodes(host, tmp_path):
    """Apply IP-Adapter Embeds with two references unfolded over a batch of two, a weight each and a mask on a 2:3
    latent, sampled by the host's KSampler with CFG: the mask reaches the joint blocks (the latent's size is
    recorded by the patch's APPLY_MODEL wrapper) and changes the result."""
    from tools.comfy_host import pack_module
    model = sd3_model()
    path = tmp_path / "ip-adapter_sd35_reduced.bin"
    factory.write_state_dict(instantx_sd35_adapter(7, blocks=2, hidden=128), path)
    adapter = pack_module("nodes.ipadapter_encode").load(str(path))
    embeds = torch.randn(2, 729, 1152, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 32, 48)
    mask[:, :, :16] = 1.0
    common = dict(model=model, ipadapter=adapter, pos_embeds=embeds, weight=[0.8, 0.4], weight_type="linear",
                  start_at=0.0, end_at=1.0, embeds_scaling="V only", unfold_batch=True)
    (masked,) = run_node(host, "ImagePromptApplyEmbeds", attn_mask=mask, **common)
    (unmasked,) = run_node(host, "ImagePromptApplyEmbeds", **common)
    (spec,) = masked.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].prompt.adapters
    assert spec.cond_embeds.shape[0] == 2 and spec.image_weights == (0.8, 0.4) and spec.mask.shape == (1, 32, 48)

    g = torch.Generator().manual_seed(4)
    positive = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    negative = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    latent = {"samples": torch.zeros(2, 16, 8, 12)}
    sample = lambda m: host.KSampler().sample(m, 5, 2, 4.0, "euler", "simple", positive, negative, latent)[0]["samples"]
    plain, with_mask, without = sample(model), sample(masked), sample(unmasked)
    assert torch.isfinite(with_mask).all()
    assert (with_mask - plain).abs().max() > 1e-3 and (with_mask - without).abs().max() > 1e-3


@pytest.mark.host
def test_the_published_file_on_another_width_and_per_step_limits_are_named(host, published, tmp_path):
    from tools.comfy_host import pack_module
    load = pack_module("nodes.ipadapter_encode").load
    common = dict(model=sd3_model(), pos_embeds=torch.zeros(1, 729, 1152), weight=1.0, weight_type="linear",
                  start_at=0.0, end_at=1.0)
    with pytest.raises(ValueError, match=r"ip-adapter.bin is a SD35 IP-Adapter \(38 joint blocks, context width 2432\) "
                                         r"but the model is an SD3 MMDiT \(2 joint blocks, context width 128\)"):
        run_node(host, "ImagePromptApplyEmbeds", ipadapter=load(str(published)), embeds_scaling="V only", **common)
    reduced = tmp_path / "reduced.bin"
    factory.write_state_dict(instantx_sd35_adapter(6, blocks=2, hidden=128), reduced)
    with pytest.raises(ValueError, match=r"embeds_scaling: reduced.bin \(instantx_sd35\) takes 'V only' \(its image "
                                         r"keys share the joint attention's softmax\); got 'K\+V'"):
        run_node(host, "ImagePromptApplyEmbeds", ipadapter=load(str(reduced)), embeds_scaling="K+V", **common)


@pytest.mark.host
@pytest.mark.models("clip_vision/sigclip_vision_patch14_384.pt", "clip_vision/clip_vision_l.pt")
def test_siglip_through_the_hosts_loader_gives_the_hidden_states_the_adapter_reads(host, published):
    """The host's CLIPVisionLoader on SigLIP so400m: its penultimate hidden states are transformers'
    ``hidden_states[-2]`` (what diffusers' SD3 pipeline feeds the adapter); another encoder is named as wrong."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tools.comfy_host import pack_module
    from tools.factory.dit_models import SIGLIP_SO400M
    import comfy.clip_vision
    (siglip,) = host.CLIPVisionLoader().load_clip("sigclip_vision_patch14_384.pt")
    image = torch.rand(1, 384, 384, 3, generator=torch.Generator().manual_seed(3))
    encode = pack_module("nodes.ipadapter_encode")
    adapter = encode.load(str(published))
    ours = encode.encode_images(adapter, siglip, image, "penultimate")
    reference = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)).eval()
    weights = torch.load(factory.ensure("clip_vision/sigclip_vision_patch14_384.pt") /
                         "clip_vision/sigclip_vision_patch14_384.pt", weights_only=True)
    reference.load_state_dict({k.removeprefix("vision_model."): v.float() for k, v in weights.items()}, strict=True)
    pixels = comfy.clip_vision.clip_preprocess(image, size=384, mean=[0.5] * 3, std=[0.5] * 3, crop=True).float()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (1, 729, 1152)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-3)  # values up to about 50
    (vit_l,) = host.CLIPVisionLoader().load_clip("clip_vision_l.pt")
    with pytest.raises(ValueError, match=r"needs the CLIP vision SigLIP-so400m-384 \(sigclip_vision_patch14_384"
                                         r".safetensors, hidden width 1152, 384 px\); the connected CLIP vision is "
                                         r"ViT-L-14"):
        encode.encode_images(adapter, vit_l, image, "penultimate")
