"""The unified loaders find adapter and CLIP vision files by what they hold, whatever they are called, beside
look-alikes (named like the preset's file but holding another variant; truncated downloads); when none fits, the
error lists what each file is. Adapter layouts are header-only safetensors files (their data a hole on disk)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from bench.model_scan import write_header_only
from ipadapter_core.model_files import choose_adapter, choose_encoder, describe, recognise
from ipadapter_core.presets import FACEID_PRESETS, PRESETS, PUBLISHED, preset_variant
from ipadapter_core.variants import BY_NAME, ENCODERS
from tools import factory
from tools.factory import dit_models, ipadapters

ENCODER_FILES = {"ViT-H-14": "CLIP-ViT-H-14-laion2B-s32B-b79K.pt", "ViT-bigG-14": "CLIP-ViT-bigG-14-laion2B-39B-b160k.pt",
                 "ViT-L-14-336": "clip-vit-large-patch14-336.pt", "ViT-L-14": "clip_vision_l.pt",
                 "SigLIP-so400m-384": "sigclip_vision_patch14_384.pt"}
CASES = [(preset, base) for table in (PRESETS, FACEID_PRESETS) for preset, bases in table.items() for base in bases]


def random_name(ext: str = ".safetensors") -> str:
    return uuid.uuid4().hex[:12] + ext


def adapter_shapes(variant: str) -> dict:
    """Key -> shape of the published file of ``variant`` at the full model's depth."""
    if variant.endswith("_flux") and variant.startswith("xlabs"):
        groups = {"": dit_models.xlabs_adapter("flux-ip-adapter" + ("-v2" if "v2" in variant else ""), 1, blocks=19)}
    elif variant == "instantx_flux":
        groups = dit_models.instantx_flux_adapter(1, blocks=57)
    elif variant == "instantx_sd35":
        groups = dit_models.instantx_sd35_adapter(1, blocks=38)
    else:
        v = ipadapters.BY_STEM[PUBLISHED[variant].file.rsplit(".", 1)[0]]
        groups = {"image_proj": ipadapters.image_proj_shapes(v), v.attn_group: ipadapters.ip_adapter_shapes(v)}
    return {(f"{group}.{key}" if group else key): tuple(getattr(shape, "shape", shape)) for group, tensors in groups.items()
            for key, shape in tensors.items()}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Every variant under a random name, its look-alikes, and every encoder under a random name and under another's
    public name; headers only (encoders: the factory files' shapes)."""
    root = tmp_path_factory.mktemp("library")
    files = {"adapter": {}, "named_like": {}, "truncated": {}, "encoder": {}, "encoder_like": {}}
    for name in {v for table in (PRESETS, FACEID_PRESETS) for bases in table.values() for v in bases.values()}:
        shapes = adapter_shapes(name)
        files["adapter"][name] = write_header_only(root / random_name(), shapes)
        public = Path(PUBLISHED[name].file).stem
        other = "plus_sdxl" if BY_NAME[name].base == "sd15" else "plus_sd15"  # another layout, named like this one
        (root / name).mkdir()
        files["named_like"][name] = write_header_only(root / name / f"{public}.safetensors", adapter_shapes(other))
        files["truncated"][name] = write_header_only(root / name / f"{public}-download.safetensors", shapes, cut=1000)
    models = factory.ensure(*(f"clip_vision/{file}" for file in ENCODER_FILES.values()))
    for encoder, file in ENCODER_FILES.items():
        state = torch.load(models / "clip_vision" / file, map_location="cpu", weights_only=True, mmap=True)
        files["encoder"][encoder] = write_header_only(root / random_name(), {k: tuple(v.shape) for k, v in state.items()})
    for encoder, file in ENCODER_FILES.items():  # named as this encoder's file, holding the next one
        other = list(ENCODER_FILES)[(list(ENCODER_FILES).index(encoder) + 1) % len(ENCODER_FILES)]
        files["encoder_like"][encoder] = root / Path(ENCODERS[encoder]["file"]).name
        files["encoder_like"][encoder].symlink_to(files["encoder"][other])
    return files


def listing(*paths: Path, kind: str = "ipadapter") -> list:
    return [(path.name, recognise(str(path), kind)) for path in paths]


@pytest.mark.unit
@pytest.mark.parametrize("preset, base", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_every_preset_finds_its_file_and_encoder_under_a_random_name(library, preset, base):
    variant = preset_variant(preset, base, PRESETS if preset in PRESETS else FACEID_PRESETS)
    target = library["adapter"][variant.name]
    widths = recognise(str(target), "ipadapter").adapter.layer_widths
    files = listing(library["named_like"][variant.name], library["truncated"][variant.name], target)
    found, seen = choose_adapter(files, variant, lambda adapter: adapter.layer_widths == widths)
    assert found is not None and found.path == str(target), seen
    assert "truncated: its header describes" in seen[1]
    for encoder in {variant.encoder, variant.clip_encoder} & set(ENCODERS):
        files = listing(library["encoder_like"][encoder], library["encoder"][encoder], kind="clip_vision")
        found, seen = choose_encoder(files, encoder, variant.encoder_output == "pooled")
        assert found is not None and found.path == str(library["encoder"][encoder]), seen


@pytest.mark.unit
def test_every_variant_has_a_preset_or_says_why_not():
    assert set(PUBLISHED) == set(BY_NAME)
    for name, row in PUBLISHED.items():
        assert bool(row.preset) != bool(row.why_not), name
    assert preset_variant("SD3.5 INSTANTX", "sd35").name == "instantx_sd35"
    assert PUBLISHED["instantx_sd35"].file == "ip-adapter.bin" == factory.CATALOGUE[
        "ipadapter/sd35_layout_ip-adapter.bin"].stands_for[0]
    with pytest.raises(ValueError, match="preset: 'SD3.5 INSTANTX' has no SD15 IP-Adapter"):
        preset_variant("SD3.5 INSTANTX", "sd15")


@pytest.mark.unit
def test_a_scan_is_remembered_until_the_file_changes(library, tmp_path):
    path = write_header_only(tmp_path / "a.safetensors", adapter_shapes("plus_sd15"))
    first = recognise(str(path), "ipadapter")
    assert recognise(str(path), "ipadapter") is first
    write_header_only(path, adapter_shapes("base_sd15"))
    assert describe(recognise(str(path), "ipadapter")) == "base or light (same weights' shapes; its name names none), " \
                                                         "SD1.5, needs ViT-H-14"


@pytest.mark.unit
def test_inspect_models_reports_each_file_and_the_presets_it_satisfies(library, tmp_path):
    (tmp_path / "ipadapter").mkdir()
    (tmp_path / "clip_vision").mkdir()
    (tmp_path / "ipadapter" / "ip_adapter.safetensors").symlink_to(library["adapter"]["plus-face_sdxl"])
    (tmp_path / "ipadapter" / "x.safetensors").symlink_to(library["truncated"]["base_sd15"])
    (tmp_path / "clip_vision" / "model.safetensors").symlink_to(library["encoder"]["ViT-bigG-14"])
    result = subprocess.run([sys.executable, "-m", "ipadapter_core.inspect", "--models", str(tmp_path)],
                            capture_output=True, text=True, cwd=factory.comfy_host.REPO_ROOT)
    assert result.returncode == 0, result.stderr
    adapter, truncated, encoder = result.stdout.splitlines()
    assert adapter == "ipadapter/ip_adapter.safetensors: plus or plus-face or composition (same weights' shapes; its " \
                      "name names none), SDXL, needs ViT-H-14 (70 layers) -> PLUS on SDXL (no ViT-H-14 in clip_vision); " \
                      "PLUS FACE on SDXL (no ViT-H-14 in clip_vision); COMPOSITION on SDXL (no ViT-H-14 in clip_vision)"
    assert truncated.startswith("ipadapter/x.safetensors: truncated: its header describes ")
    assert truncated.endswith(" -> no preset")
    assert encoder == "clip_vision/model.safetensors: CLIP vision ViT-bigG-14 -> VIT-G on SD1.5, SDXL"


# --- through the host's loaders ------------------------------------------------------------------------------

@pytest.fixture
def folders(host, tmp_path, monkeypatch):
    """The host's ipadapter folders (two, as with an extra_model_paths.yaml entry) and clip_vision folder, empty."""
    import folder_paths
    made = {name: tmp_path / name for name in ("ipadapter", "extra_ipadapter", "clip_vision")}
    for path in made.values():
        path.mkdir()
    for kind, paths in (("ipadapter", [made["ipadapter"], made["extra_ipadapter"]]),
                        ("clip_vision", [made["clip_vision"]])):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind,
                            ([str(p) for p in paths], folder_paths.folder_names_and_paths[kind][1]))
    return made


def tiny_adapter(path: Path, stem: str) -> Path:
    """The factory's ``stem`` layout over the tiny SD1.5 UNet's four layers."""
    factory.write_state_dict(ipadapters.adapter_state_dict(ipadapters.BY_STEM[stem], 5, factory.TINY_SD15_WIDTHS), path)
    return path


@pytest.mark.host
def test_unified_loaders_find_random_names_in_every_folder_and_list_what_they_found(host, need_models, folders, library):
    from support.nodes import run_node
    models = need_models("checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter_sd15.bin",
                         "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt", "clip_vision/CLIP-ViT-bigG-14-laion2B-39B-b160k.pt")
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    face = tiny_adapter(folders["extra_ipadapter"] / random_name(".bin"), "ip-adapter-plus-face_sd15")
    plusv2 = tiny_adapter(folders["ipadapter"] / random_name(".bin"), "ip-adapter-faceid-plusv2_sd15")
    shutil.copyfile(models / "ipadapter/tiny_ip-adapter_sd15.bin", folders["ipadapter"] / "ip-adapter-plus-face_sd15.bin")
    (folders["ipadapter"] / "ip-adapter-plus-face_sd15.safetensors").symlink_to(library["truncated"]["plus-face_sd15"])
    shutil.copyfile(models / "clip_vision/CLIP-ViT-bigG-14-laion2B-39B-b160k.pt",
                    folders["clip_vision"] / "CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    with pytest.raises(FileNotFoundError) as missing:
        run_node(host, "ImagePromptUnifiedLoader", model=model, preset="PLUS FACE")
    assert "preset 'PLUS FACE' needs the CLIP vision ViT-H-14: CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in " \
           f"{folders['clip_vision']} (from huggingface.co/h94/IP-Adapter (models/image_encoder), under any file " \
           "name); found there: CLIP-ViT-H-14-laion2B-s32B-b79K.pt: CLIP vision ViT-bigG-14" == str(missing.value)
    encoder = shutil.copyfile(models / "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt",
                              folders["clip_vision"] / random_name(".pt"))
    _, adapter, clip_vision = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="PLUS FACE")
    assert (adapter.file.name, adapter.file.variant.name) == (face.name, "plus-face_sd15")
    assert clip_vision.encode_image(torch.rand(1, 32, 32, 3)).image_embeds.shape == (1, 1024)
    _, adapter, _ = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="STANDARD")
    assert (adapter.file.name, adapter.file.variant.name) == ("ip-adapter-plus-face_sd15.bin", "base_sd15")
    _, adapter, _ = run_node(host, "ImagePromptUnifiedLoaderFaceID", model=model, preset="FACEID PLUS V2",
                             lora_strength=0.0, provider="CPU")
    assert (adapter.file.name, adapter.file.variant.name, adapter.file.variant.shortcut) == \
        (plusv2.name, "faceid-plusv2_sd15", True)
    with pytest.raises(FileNotFoundError) as missing:
        run_node(host, "ImagePromptUnifiedLoader", model=model, preset="VIT-G")
    text = str(missing.value)
    assert text.startswith("preset 'VIT-G' on an SD15 model needs ip-adapter_sd15_vit-G.safetensors in ")
    for line in (f"{face.name}: plus or plus-face or composition (same weights' shapes; its name names none), SD1.5, "
                 "needs ViT-H-14", f"{plusv2.name}: faceid-plus or faceid-plusv2 (same weights' shapes; its name "
                 "names none), SD1.5, needs a face embedding and ViT-H-14 (and its LoRA)",
                 "ip-adapter-plus-face_sd15.bin: base or light (same weights' shapes; its name names none), SD1.5, "
                 "needs ViT-H-14",
                 "ip-adapter-plus-face_sd15.safetensors: truncated: its header describes"):
        assert line in text
    assert encoder.exists()


@pytest.mark.host
def test_sd35_preset_finds_instantx_adapter_and_siglip_under_random_names(host, need_models, folders, library):
    from support.nodes import run_node
    models = need_models("checkpoints/sd35_layout.ckpt", "ipadapter/sd35_layout_ip-adapter.bin",
                         "ipadapter/flux-ip-adapter.bin", "clip_vision/sigclip_vision_patch14_384.pt")
    model = host.CheckpointLoaderSimple().load_checkpoint("sd35_layout.ckpt")[0]
    adapter_file = shutil.copyfile(models / "ipadapter/sd35_layout_ip-adapter.bin", folders["ipadapter"] / random_name(".bin"))
    shutil.copyfile(models / "ipadapter/flux-ip-adapter.bin", folders["ipadapter"] / "ip-adapter.bin")  # named like it
    (folders["ipadapter"] / "ip-adapter.safetensors").symlink_to(library["truncated"]["instantx_sd35"])
    siglip = shutil.copyfile(models / "clip_vision/sigclip_vision_patch14_384.pt", folders["clip_vision"] / random_name(".pt"))
    (folders["clip_vision"] / "sigclip_vision_patch14_384.safetensors").symlink_to(library["encoder"]["ViT-L-14"])
    _, adapter, clip_vision = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="SD3.5 INSTANTX")
    assert (adapter.file.name, adapter.file.variant.name) == (adapter_file.name, "instantx_sd35")
    assert clip_vision.model.vision_model.post_layernorm.weight.shape == (1152,) and siglip.exists()
