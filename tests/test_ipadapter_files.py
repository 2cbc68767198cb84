"""Every public IP-Adapter layout is read and identified; bad files get errors that say what is wrong."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ipadapter_core.loader import AdapterFileError, load_adapter
from support.pickles import Canary, write_pickle
from tools import factory
from tools.factory.ipadapters import VARIANTS as FACTORY_VARIANTS

pytestmark = pytest.mark.unit

# Real file stem -> (variant, CLIP vision it needs), from the public model cards and §2.3-2.4 of the reference notes.
REAL_FILES = {
    "ip-adapter_sd15": ("base_sd15", "ViT-H-14"),
    "ip-adapter_sd15_light": ("light_sd15", "ViT-H-14"),
    "ip-adapter_sd15_light_v11": ("light_sd15", "ViT-H-14"),
    "ip-adapter_sd15_vit-G": ("vit-g_sd15", "ViT-bigG-14"),
    "ip-adapter-plus_sd15": ("plus_sd15", "ViT-H-14"),
    "ip-adapter-plus-face_sd15": ("plus-face_sd15", "ViT-H-14"),
    "ip-adapter-full-face_sd15": ("full-face_sd15", "ViT-H-14"),
    "ip_plus_composition_sd15": ("composition_sd15", "ViT-H-14"),
    "ip-adapter_sdxl": ("base_sdxl", "ViT-bigG-14"),
    "ip-adapter_sdxl_vit-h": ("vit-h_sdxl", "ViT-H-14"),
    "ip-adapter-plus_sdxl_vit-h": ("plus_sdxl", "ViT-H-14"),
    "ip-adapter-plus-face_sdxl_vit-h": ("plus-face_sdxl", "ViT-H-14"),
    "ip_plus_composition_sdxl": ("composition_sdxl", "ViT-H-14"),
    "ip-adapter-faceid_sd15": ("faceid_sd15", "face-embedding"),
    "ip-adapter-faceid-plus_sd15": ("faceid-plus_sd15", "face-embedding"),
    "ip-adapter-faceid-plusv2_sd15": ("faceid-plusv2_sd15", "face-embedding"),
    "ip-adapter-faceid-portrait_sd15": ("portrait_sd15", "face-embedding"),
    "ip-adapter-faceid-portrait-v11_sd15": ("portrait-v11_sd15", "face-embedding"),
    "ip-adapter-faceid_sdxl": ("faceid_sdxl", "face-embedding"),
    "ip-adapter-faceid-plusv2_sdxl": ("faceid-plusv2_sdxl", "face-embedding"),
    "ip-adapter-faceid-portrait_sdxl": ("portrait_sdxl", "face-embedding"),
    "ip-adapter-faceid-portrait_sdxl_unnorm": ("portrait-unnorm_sdxl", "face-embedding"),
    "ip_adapter_plus_general": ("plus_kolors", "ViT-L-14-336"),
    "ipa-faceid-plus": ("faceid-plus_kolors", "face-embedding"),
}
FACEID_LORA = {"ip-adapter-faceid_sd15", "ip-adapter-faceid-plus_sd15", "ip-adapter-faceid-plusv2_sd15",
               "ip-adapter-faceid_sdxl", "ip-adapter-faceid-plusv2_sdxl"}


def test_every_factory_layout_has_an_expectation():
    assert {v.stem for v in FACTORY_VARIANTS} == set(REAL_FILES)


def _params(ext):
    marks = lambda stem: [pytest.mark.heavy] if ext == ".safetensors" and not stem.endswith("sd15") else []
    return [pytest.param(f"ipadapter/{stem}{ext}", *REAL_FILES[stem], marks=marks(stem), id=f"{stem}{ext}")
            for stem in REAL_FILES]


@pytest.mark.parametrize("name, variant, encoder", _params(".bin") + _params(".safetensors"))
def test_file_is_identified_with_its_encoder(name, variant, encoder, tmp_path):
    if name.endswith(".safetensors"):  # full size (SDXL ones 0.7-2.4 GB): written here and removed, not cached
        path = tmp_path / name.split("/")[1]
        factory.write_state_dict(factory.CATALOGUE[name].build(), path)
    else:
        path = factory.ensure(name) / name
    adapter = load_adapter(path)
    assert adapter.variant.name == variant
    assert adapter.variant.encoder == encoder
    stem = name.split("/")[1].rsplit(".", 1)[0]
    assert adapter.variant.faceid_lora == (stem in FACEID_LORA)
    assert len(adapter.layer_widths) == (16 if variant.endswith("sd15") else 70)


def test_training_prefix_adapter_modules_is_read(tmp_path):
    groups = torch.load(factory.ensure("ipadapter/ip-adapter_sd15.bin") / "ipadapter/ip-adapter_sd15.bin",
                        weights_only=True)
    path = tmp_path / "trained.bin"
    torch.save({"image_proj": groups["image_proj"], "adapter_modules": groups["ip_adapter"]}, path)
    assert load_adapter(path).variant.name == "base_sd15"


def test_a_pickle_with_code_is_refused_and_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.bin"
    write_pickle(path, {"image_proj": {"x": Canary(canary)}, "ip_adapter": {}})
    with pytest.raises(AdapterFileError, match="evil.bin: refused for safety: reading it would run io.open"):
        load_adapter(path)
    assert not canary.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"not a model at all", "not a readable"),
])
def test_broken_files_name_the_problem(tmp_path, content, message):
    for ext in (".bin", ".safetensors"):
        path = tmp_path / f"broken{ext}"
        path.write_bytes(content)
        with pytest.raises(AdapterFileError, match=message):
            load_adapter(path)


def test_a_checkpoint_is_not_mistaken_for_an_adapter(tmp_path):
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(path))
    with pytest.raises(AdapterFileError, match="expected the groups image_proj and ip_adapter"):
        load_adapter(path)


def test_mismatched_key_and_value_shapes_are_reported(tmp_path):
    groups = torch.load(factory.ensure("ipadapter/ip-adapter_sd15.bin") / "ipadapter/ip-adapter_sd15.bin",
                        weights_only=True)
    groups["ip_adapter"]["3.to_v_ip.weight"] = torch.zeros(320, 1024)
    path = tmp_path / "bad.bin"
    torch.save(groups, path)
    with pytest.raises(AdapterFileError, match=r"layer 3 needs to_k_ip and to_v_ip of one 2-D shape"):
        load_adapter(path)


def test_inspect_command_prints_one_json_line_per_file(tmp_path):
    models = factory.ensure("ipadapter/ip-adapter-plus_sd15.bin", "ipadapter/ip-adapter_sdxl.bin")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"\0" * 10)
    files = [models / "ipadapter/ip-adapter-plus_sd15.bin", models / "ipadapter/ip-adapter_sdxl.bin", broken]
    result = subprocess.run([sys.executable, "-m", "ipadapter_core.inspect", *map(str, files)],
                            capture_output=True, text=True, cwd=factory.comfy_host.REPO_ROOT)
    assert result.returncode == 1
    plus, sdxl, bad = (json.loads(line) for line in result.stdout.splitlines())
    assert plus == {"file": str(files[0]), "variant": "plus_sd15", "base": "sd15", "tokens": 16,
                    "encoder": "ViT-H-14", "encoder_output": "penultimate", "faceid_lora": False,
                    "encoder_file": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}
    assert (sdxl["variant"], sdxl["encoder"], sdxl["encoder_output"], sdxl["tokens"]) == \
        ("base_sdxl", "ViT-bigG-14", "image_embeds", 4)
    assert bad["file"] == str(broken) and "not a readable" in bad["error"]


@pytest.mark.parametrize("stem, variant, tokens", [("flux-ip-adapter", "xlabs_flux", 4),
                                                   ("flux-ip-adapter-v2", "xlabs-v2_flux", 16)])
def test_xlabs_flux_files_are_identified_at_the_published_depth(stem, variant, tokens, tmp_path):
    """XLabs' flat keys over FLUX.1's 19 double-stream blocks (a weights-only pickle of the same keys here; the
    Flux parity tests read the safetensors form): K/V with biases, numbered by block."""
    from tools.factory.dit_models import xlabs_adapter
    path = tmp_path / f"{stem}.bin"
    factory.write_state_dict(xlabs_adapter(stem, 3, blocks=19), path)
    adapter = load_adapter(path)
    assert (adapter.variant.name, adapter.variant.encoder, adapter.variant.tokens) == (variant, "ViT-L-14", tokens)
    assert adapter.layer_widths == (3072,) * 19 and list(adapter.layer_ids) == list(range(19))
    assert len(adapter.kv_weights("k", "bias")) == 19 and adapter.kv_weights("v")[0].shape == (3072, 4096)
    result = subprocess.run([sys.executable, "-m", "ipadapter_core.inspect", str(path)], capture_output=True,
                            text=True, cwd=factory.comfy_host.REPO_ROOT)
    assert json.loads(result.stdout) == {"file": str(path), "variant": variant, "base": "flux", "tokens": tokens,
                                         "encoder": "ViT-L-14", "encoder_output": "image_embeds",
                                         "faceid_lora": False, "encoder_file": "clip_vision_l.safetensors"}
