"""Every factory model goes through the host's own loader nodes and comes out as the real thing."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def attn2_keys(model_patcher) -> list[tuple]:
    """(block, id, depth) of every cross-attention layer, in the host's execution order."""
    unet = model_patcher.model.diffusion_model
    keys = []
    for name, module in unet.named_modules():
        if not name.endswith(".attn2"):
            continue
        parts = name.split(".")
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        block_id = 0 if block == "middle" else int(parts[1])
        keys.append((block, block_id, int(parts[-2])))
    return keys


def load_checkpoint(host, name):
    return host.CheckpointLoaderSimple().load_checkpoint(name)


def test_tiny_sd15_is_detected_and_runs(host, need_models):
    need_models("checkpoints/tiny_sd15.ckpt")
    model, clip, vae = load_checkpoint(host, "tiny_sd15.ckpt")
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.diffusion_model.in_channels == 4
    assert attn2_keys(model) == [("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]
    (cond,) = host.CLIPTextEncode().encode(clip, "a red cube")
    assert cond[0][0].shape == (1, 77, 768)
    image = torch.rand(1, 64, 64, 3)
    (latent,) = host.VAEEncode().encode(vae, image)
    assert latent["samples"].shape == (1, 4, 8, 8)
    (sampled,) = host.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", cond, cond, latent, denoise=1.0)
    (decoded,) = host.VAEDecode().decode(vae, sampled)
    assert decoded.shape == (1, 64, 64, 3) and torch.isfinite(decoded).all()


def test_ip2p_checkpoint_is_detected_as_edit_model(host, need_models):
    need_models("checkpoints/tiny_sd15_ip2p.ckpt")
    model, _, _ = load_checkpoint(host, "tiny_sd15_ip2p.ckpt")
    assert type(model.model.model_config).__name__ == "SD15_instructpix2pix"
    assert model.model.diffusion_model.in_channels == 8


def test_controlnet_loads_and_steers_the_tiny_unet(host, need_models):
    need_models("checkpoints/tiny_sd15.ckpt", "controlnet/tiny_sd15_controlnet.pth")
    model, clip, _ = load_checkpoint(host, "tiny_sd15.ckpt")
    (control,) = host.ControlNetLoader().load_controlnet("tiny_sd15_controlnet.pth")
    assert type(control).__name__ == "ControlNet"
    (cond,) = host.CLIPTextEncode().encode(clip, "a red cube")
    hint = torch.rand(1, 64, 64, 3)
    positive, negative = host.ControlNetApplyAdvanced().apply_controlnet(cond, cond, control, hint, 1.0, 0.0, 1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (plain,) = host.KSampler().sample(model, 7, 1, 1.0, "euler", "normal", cond, cond, latent)
    (steered,) = host.KSampler().sample(model, 7, 1, 1.0, "euler", "normal", positive, negative, latent)
    assert torch.isfinite(steered["samples"]).all()
    assert not torch.equal(plain["samples"], steered["samples"])


def _vision(file_name, *expected, heavy=False):
    marks = [pytest.mark.models(f"clip_vision/{file_name}")] + ([pytest.mark.heavy] if heavy else [])
    return pytest.param(file_name, *expected, marks=marks, id=file_name)


@pytest.mark.parametrize("file_name, embeds, hidden", [
    _vision("CLIP-ViT-H-14-laion2B-s32B-b79K.pt", 1024, (257, 1280)),
    _vision("clip-vit-large-patch14-336.pt", 768, (577, 1024)),
    _vision("CLIP-ViT-bigG-14-laion2B-39B-b160k.pt", 1280, (257, 1664), heavy=True),
])
def test_clip_vision_loads_and_encodes(host, file_name, embeds, hidden):
    (clip_vision,) = host.CLIPVisionLoader().load_clip(file_name)
    (output,) = host.CLIPVisionEncode().encode(clip_vision, torch.rand(1, 300, 200, 3), "center")
    assert output.image_embeds.shape == (1, embeds)
    assert output.penultimate_hidden_states.shape == (1, *hidden)
    assert torch.isfinite(output.image_embeds).all() and torch.isfinite(output.penultimate_hidden_states).all()


@pytest.mark.heavy
@pytest.mark.models("checkpoints/sd15_layout.ckpt")
def test_full_sd15_layout_has_the_real_16_cross_attention_layers(host):
    model, clip, vae = load_checkpoint(host, "sd15_layout.ckpt")
    assert type(model.model.model_config).__name__ == "SD15"
    expected = ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
                + [("output", i, 0) for i in range(3, 12)])
    assert attn2_keys(model) == expected
    widths = [m.to_k.out_features for n, m in model.model.diffusion_model.named_modules() if n.endswith(".attn2")]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


# The two CLIP-L keys SDXL base files lack (it is a CLIPTextModel there): the host expects them missing.
SDXL_CLIP_L_ABSENT = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}


def test_sdxl_text_encoders_fill_the_hosts_sdxl_text_model(host):
    """CLIP-L and OpenCLIP bigG text in the base checkpoint's layout, through the host's own SDXL key
    conversion, give every weight of its SDXL text model with its shape (built on the meta device)."""
    import comfy.sdxl_clip
    import comfy.supported_models
    from tools.factory import host_models as hm
    from tools.factory.pool import WeightPools
    sd = hm.sdxl_text_encoders(WeightPools(0))
    assert sum(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in sd) == 197
    assert sum(k.startswith("conditioner.embedders.1.model.") for k in sd) == 390
    assert sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    converted = comfy.supported_models.SDXL(hm.SDXL_UNET).process_clip_state_dict(dict(sd))
    with torch.device("meta"):
        expected = comfy.sdxl_clip.SDXLClipModel(device="meta").state_dict()
    assert set(expected) - set(converted) == SDXL_CLIP_L_ABSENT
    assert set(converted) - set(expected) == {"clip_l.transformer.text_model.embeddings.position_ids"}
    assert [k for k in converted if k in expected and converted[k].shape != expected[k].shape] == []


@pytest.mark.heavy
@pytest.mark.models("checkpoints/sdxl_layout.ckpt")
def test_full_sdxl_layout_has_the_real_70_cross_attention_layers_and_text_encoders(host, caplog):
    model, clip, _ = load_checkpoint(host, "sdxl_layout.ckpt")
    assert not [r for r in caplog.records if "clip missing" in r.getMessage() or "no CLIP" in r.getMessage()]
    (cond,) = host.CLIPTextEncode().encode(clip, "a red cube")
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(cond[0][0]).all() and torch.isfinite(cond[0][1]["pooled_output"]).all()
    assert type(model.model.model_config).__name__ == "SDXL"
    keys = attn2_keys(model)
    assert len(keys) == 70
    assert keys.count(("middle", 0, 9)) == 1 and ("input", 8, 9) in keys and ("output", 5, 1) in keys
    contexts = {m.to_k.in_features for n, m in model.model.diffusion_model.named_modules() if n.endswith(".attn2")}
    assert contexts == {2048}


def test_flux_files_have_black_forest_labs_key_names_whichever_host_builds_them(host):
    """Newer hosts name the per-head RMS norms' weights ``*_norm.weight`` in their modules and rename a file's
    ``*_norm.scale`` on loading; the factory writes the published names, so one cached file serves every host."""
    from tools.factory import dit_models
    for shapes in (dit_models.flux_shapes(dit_models.FLUX_REDUCED), dit_models.xlabs_controlnet(1)):
        norms = [key for key in shapes if "_norm." in key and ".norm." in key]
        assert norms and all(key.endswith(("query_norm.scale", "key_norm.scale")) for key in norms), norms[:4]
