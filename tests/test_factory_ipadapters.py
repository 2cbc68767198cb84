"""The factory's IP-Adapter files have the layout of the real public files.

The reference is diffusers (written by others, its loaders read the real files): its image_proj
converter must load every generated ``image_proj`` strictly into the expected projection class, and
its attention converter, run on UNets built on the meta device from the real SD1.5/SDXL/Kolors
configs, must place every ``to_k_ip``/``to_v_ip`` on a cross-attention processor of that width.
Headline shapes from the reference table (shared/reference/ip_adapter.md §2.3) are written out below.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch

import diffusers.loaders.unet as diffusers_unet_loader
from diffusers import UNet2DConditionModel
from diffusers.models import embeddings
from safetensors.torch import load_file

from tools.factory import write_state_dict
from tools.factory.ipadapters import BY_STEM, VARIANTS, adapter_state_dict

_SDXL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
UNET_CONFIGS = {  # fields of each base model's published unet/config.json
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": _SDXL,
    "kolors": dict(_SDXL, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
                   projection_class_embeddings_input_dim=5632),
}

_LINEAR15 = ("ImageProjection", {"proj.weight": (3072, 1024), "norm.weight": (768,)})
_PLUS15 = ("IPAdapterPlusImageProjection", {
    "latents": (1, 16, 768), "proj_in.weight": (768, 1280), "layers.0.0.to_q.weight": (768, 768),
    "layers.0.0.to_kv.weight": (1536, 768), "layers.0.0.to_out.weight": (768, 768),
    "layers.0.1.1.weight": (3072, 768), "layers.0.1.3.weight": (768, 3072), "proj_out.weight": (768, 768)})
_PLUSXL = ("IPAdapterPlusImageProjection", {
    "latents": (1, 16, 1280), "proj_in.weight": (1280, 1280), "layers.0.0.to_q.weight": (1280, 1280),
    "layers.0.0.to_kv.weight": (2560, 1280), "layers.0.0.to_out.weight": (1280, 1280),
    "layers.0.1.1.weight": (5120, 1280), "proj_out.weight": (2048, 1280), "norm_out.weight": (2048,)})
_FACEID_PLUS15 = ("IPAdapterFaceIDPlusImageProjection", {
    "proj.0.weight": (1024, 512), "proj.2.weight": (3072, 1024), "norm.weight": (768,),
    "perceiver_resampler.proj_in.weight": (768, 1280), "perceiver_resampler.layers.0.0.to_q.weight": (768, 768),
    "perceiver_resampler.layers.0.0.to_kv.weight": (1536, 768)})
_PORTRAIT15 = ("IPAdapterFaceIDImageProjection", {"proj.2.weight": (12288, 1024), "norm.weight": (768,)})
# stem -> (diffusers projection class, image_proj shapes from the §2.3 table)
REAL = {
    "ip-adapter_sd15": _LINEAR15,
    "ip-adapter_sd15_light": _LINEAR15,
    "ip-adapter_sd15_light_v11": _LINEAR15,
    "ip-adapter_sd15_vit-G": ("ImageProjection", {"proj.weight": (3072, 1280), "norm.weight": (768,)}),
    "ip-adapter-plus_sd15": _PLUS15,
    "ip-adapter-plus-face_sd15": _PLUS15,
    "ip_plus_composition_sd15": _PLUS15,
    "ip-adapter-full-face_sd15": ("IPAdapterFullImageProjection", {
        "proj.0.weight": (1280, 1280), "proj.2.weight": (768, 1280), "proj.3.weight": (768,)}),
    "ip-adapter_sdxl": ("ImageProjection", {"proj.weight": (8192, 1280), "norm.weight": (2048,)}),
    "ip-adapter_sdxl_vit-h": ("ImageProjection", {"proj.weight": (8192, 1024), "norm.weight": (2048,)}),
    "ip-adapter-plus_sdxl_vit-h": _PLUSXL,
    "ip-adapter-plus-face_sdxl_vit-h": _PLUSXL,
    "ip_plus_composition_sdxl": _PLUSXL,
    "ip-adapter-faceid_sd15": ("IPAdapterFaceIDImageProjection", {
        "proj.0.weight": (1024, 512), "proj.2.weight": (3072, 1024), "norm.weight": (768,)}),
    "ip-adapter-faceid-plus_sd15": _FACEID_PLUS15,
    "ip-adapter-faceid-plusv2_sd15": _FACEID_PLUS15,
    "ip-adapter-faceid-portrait_sd15": _PORTRAIT15,
    "ip-adapter-faceid-portrait-v11_sd15": _PORTRAIT15,
    "ip-adapter-faceid_sdxl": ("IPAdapterFaceIDImageProjection", {
        "proj.2.weight": (8192, 1024), "norm.weight": (2048,)}),
    "ip-adapter-faceid-plusv2_sdxl": ("IPAdapterFaceIDPlusImageProjection", {
        "proj.2.weight": (8192, 1024), "perceiver_resampler.proj_in.weight": (2048, 1280),
        "perceiver_resampler.layers.0.0.to_q.weight": (2048, 2048),
        "perceiver_resampler.layers.0.0.to_kv.weight": (4096, 2048),
        "perceiver_resampler.layers.0.1.1.weight": (8192, 2048)}),
    "ip-adapter-faceid-portrait_sdxl": ("IPAdapterFaceIDImageProjection", {
        "proj.2.weight": (32768, 1024), "norm.weight": (2048,)}),
    "ip-adapter-faceid-portrait_sdxl_unnorm": ("IPAdapterPlusImageProjection", {
        "latents": (1, 16, 1280), "proj_in.weight": (1280, 512), "proj_out.weight": (2048, 1280)}),
    "ip_adapter_plus_general": ("IPAdapterPlusImageProjection", {
        "latents": (1, 16, 2048), "proj_in.weight": (2048, 1024), "layers.0.0.to_q.weight": (768, 2048),
        "layers.0.0.to_kv.weight": (1536, 2048), "layers.0.0.to_out.weight": (2048, 768),
        "layers.0.1.1.weight": (8192, 2048), "proj_out.weight": (2048, 2048)}),
    # §2.3 gives D=4096, 6 tokens, ViT-L-336 input (1024) and to_out [4096, ...]; the rest is the FaceID-Plus
    # projection at that width (perceiver heads = 4096 / 64)
    "ipa-faceid-plus": ("IPAdapterFaceIDPlusImageProjection", {
        "proj.0.weight": (1024, 512), "proj.2.weight": (6 * 4096, 1024), "norm.weight": (4096,),
        "perceiver_resampler.proj_in.weight": (4096, 1024),
        "perceiver_resampler.layers.0.0.to_out.weight": (4096, 4096),
        "perceiver_resampler.proj_out.weight": (4096, 4096)}),
}
# diffusers hard-codes 4 FaceID-Plus tokens; Kolors FaceID has 6, so that one constructor argument is overridden
DIFFUSERS_OVERRIDES = {"ipa-faceid-plus": {"num_tokens": 6}}
# Kolors' FaceID pipeline loads params["adapter_modules"]; every other file has "ip_adapter"
ATTN_GROUP = {"ipa-faceid-plus": "adapter_modules"}
KOLORS = {"ip_adapter_plus_general", "ipa-faceid-plus"}
BASE = {stem: "kolors" if stem in KOLORS else "sd15" if "sd15" in stem else "sdxl" for stem in REAL}
HAS_LORA = {"ip-adapter-faceid_sd15", "ip-adapter-faceid-plus_sd15", "ip-adapter-faceid-plusv2_sd15",
            "ip-adapter-faceid_sdxl", "ip-adapter-faceid-plusv2_sdxl"}
LORA_RANK = 128


class _MetaUNet(UNet2DConditionModel):
    """A UNet whose processors never change: diffusers' attention converter reads ``attn_processors``
    (a walk over the whole model) once per processor, quadratic on SDXL's 140; cache it."""

    @functools.cached_property
    def attn_processors(self):
        return super().attn_processors


@pytest.fixture(scope="module")
def unets():
    with torch.device("meta"):
        return {base: _MetaUNet(**config) for base, config in UNET_CONFIGS.items()}


@contextlib.contextmanager
def _on_meta():
    """Build diffusers modules on the meta device: strict loads still check keys and shapes, copy nothing."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        yield


def _write_and_load(stem, path):
    """{"image_proj": {...}, "ip_adapter": {...}} read back from a written file, which is then removed
    (SDXL safetensors are full size, 0.7-2.4 GB)."""
    write_state_dict(adapter_state_dict(BY_STEM[stem], seed=7), path)
    try:
        if path.suffix == ".bin":
            assert path.stat().st_size < 32 << 20  # views into shared pools
            return torch.load(path, weights_only=True)
        groups = {}
        for key, value in load_file(path).items():
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = value
        return groups
    finally:
        path.unlink()


def _expected_lora_shapes(unet):
    """Processor id -> LoRA shapes from the diffusers Attention module that owns the processor."""
    shapes = {}
    for pid, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
            shapes[f"{pid}.to_{proj}_lora.down.weight"] = (LORA_RANK, linear.in_features)
            shapes[f"{pid}.to_{proj}_lora.up.weight"] = (linear.out_features, LORA_RANK)
    return shapes


@pytest.mark.unit
def test_table_lists_every_public_file():
    assert set(BY_STEM) == set(REAL)
    assert len(VARIANTS) == len(BY_STEM)


@pytest.mark.unit
@pytest.mark.parametrize("stem", list(REAL))
def test_files_have_real_layout(stem, tmp_path, unets, monkeypatch):
    groups = _write_and_load(stem, tmp_path / f"{stem}.bin")
    unflattened = _write_and_load(stem, tmp_path / f"{stem}.safetensors")
    attn_group = ATTN_GROUP.get(stem, "ip_adapter")
    assert set(groups) == set(unflattened) == {"image_proj", attn_group}
    for name, group in groups.items():  # the safetensors file holds the same tensors, flattened
        assert set(unflattened[name]) == set(group)
        assert all(torch.equal(unflattened[name][k], t) for k, t in group.items())
    assert all(t.dtype == torch.float16 for g in groups.values() for t in g.values())
    image_proj, ip_adapter = groups["image_proj"], groups[attn_group]
    cls_name, headline = REAL[stem]
    assert {k: tuple(image_proj[k].shape) for k in headline} == headline

    cls = getattr(embeddings, cls_name)
    if stem in DIFFUSERS_OVERRIDES:
        monkeypatch.setattr(diffusers_unet_loader, cls_name, functools.partial(cls, **DIFFUSERS_OVERRIDES[stem]))
    unet = unets[BASE[stem]]
    adapter = {"image_proj": image_proj, "ip_adapter": ip_adapter}  # the group name diffusers reads
    with _on_meta():
        # both converters load strictly: a missing, unexpected or mis-shaped key raises
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
        processors = unet._convert_ip_adapter_attn_to_diffusers([adapter], low_cpu_mem_usage=False)
    assert type(projection) is cls

    cross = [name for name in processors if name.endswith("attn2.processor")]
    assert len(cross) == {"sd15": 16, "sdxl": 70, "kolors": 70}[BASE[stem]]
    expected = {}
    for i, name in enumerate(cross):  # diffusers gives the i-th cross-attention processor key id 2i+1
        attn2 = unet.get_submodule(name.removesuffix(".processor"))
        for kv, layer in (("k", processors[name].to_k_ip[0]), ("v", processors[name].to_v_ip[0])):
            expected[f"{2 * i + 1}.to_{kv}_ip.weight"] = (attn2.to_k.out_features, unet.config.cross_attention_dim)
            assert tuple(layer.weight.shape) == expected[f"{2 * i + 1}.to_{kv}_ip.weight"]
    if stem in HAS_LORA:
        expected.update(_expected_lora_shapes(unet))
        assert len(unet._load_ip_adapter_loras([adapter])[0]) == 8 * len(unet.attn_processors)
    assert {k: tuple(t.shape) for k, t in ip_adapter.items()} == expected
