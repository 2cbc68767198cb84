"""Our image projections compute what diffusers' do, with the same weights.

The reference is diffusers (written by others): its own converter
``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers`` renames each factory file's
``image_proj`` into its projection class and loads it strictly. Both modules run in float32 on the
same seeded inputs and must agree to float32 rounding.
"""
from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import diffusers.loaders.unet as diffusers_unet_loader
from diffusers import UNet2DConditionModel

from ipadapter_core.loader import load_adapter
from ipadapter_core.projection import build_projection
from tools import factory
from tools.factory.ipadapters import VARIANTS

ATOL = 1e-5
BATCH, SEQ = 2, 5  # input tokens: the math is per token or attention over any length, so a short sequence will do
HEAVY = {"ipa-faceid-plus"}  # 852 M parameters (4096-wide perceiver): about 7 GB for the two float32 copies


def _params():
    return [pytest.param(v.stem, marks=[pytest.mark.heavy] if v.stem in HEAVY else [], id=v.stem) for v in VARIANTS]


def _adapter(stem):
    name = f"ipadapter/{stem}.bin"
    return load_adapter(factory.ensure(name) / name)


def _reference(image_proj, monkeypatch):
    """diffusers' projection module, built by its own converter from the file's tensors in float32.
    Its constructors' random initialisation is skipped: the converter's strict load overwrites every weight."""
    stand_in = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)  # the converter's `self`
    state_dict = {k: v.float() for k, v in image_proj.items()}
    with monkeypatch.context() as patch:
        patch.setattr(nn.Linear, "reset_parameters", lambda self: None)
        patch.setattr(nn.LayerNorm, "reset_parameters", lambda self: None)
        if "perceiver_resampler.proj_in.weight" in image_proj:  # diffusers hard-codes 4 FaceID-Plus tokens
            tokens = image_proj["proj.2.weight"].shape[0] // image_proj["norm.weight"].shape[0]
            cls = diffusers_unet_loader.IPAdapterFaceIDPlusImageProjection
            patch.setattr(diffusers_unet_loader, cls.__name__, functools.partial(cls, num_tokens=tokens))
        module = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(stand_in, state_dict,
                                                                                  low_cpu_mem_usage=False)
    return module.float().eval()


def _run_both(variant, ours, theirs, generator):
    """(our output, diffusers' output) for seeded inputs of the variant's kind."""
    randn = functools.partial(torch.randn, generator=generator)
    kind = variant.projection
    if kind == "faceid_plus":
        face = randn(BATCH, 512)
        clip_hidden = randn(BATCH, SEQ, ours.perceiver_resampler.proj_in.in_features)
        theirs.clip_embeds = clip_hidden[:, None]  # diffusers takes [B, images, N, E]
        theirs.shortcut, theirs.shortcut_scale = variant.shortcut, 0.7
        return ours(face, clip_hidden, shortcut_scale=0.7), theirs(face)
    if kind == "resampler" and variant.embed_dim == 512:  # portrait-unnorm: one face vector, one token
        face = randn(BATCH, 512)
        return ours(face), theirs(face[:, None])
    x = randn(BATCH, variant.embed_dim) if kind in ("linear", "faceid") else randn(BATCH, SEQ, variant.embed_dim)
    return ours(x), theirs(x)


@pytest.mark.unit
@pytest.mark.parametrize("stem", _params())
def test_projection_matches_diffusers(stem, monkeypatch):
    adapter = _adapter(stem)
    variant = adapter.variant
    ours = build_projection(variant, adapter.image_proj)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    theirs = _reference(adapter.image_proj, monkeypatch)
    with torch.no_grad():
        out, ref = _run_both(variant, ours, theirs, torch.Generator().manual_seed(0))
    assert out.shape == ref.shape
    assert out.shape[:2] == (BATCH, SEQ if variant.projection == "mlp" else variant.tokens)
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL, f"{variant.name}: max |ours - diffusers| = {diff:.3g} (output scale {ref.abs().max():.3g})"


@pytest.fixture(scope="module")
def plus_sd15():
    return _adapter("ip-adapter-plus_sd15")


@pytest.mark.unit
@pytest.mark.parametrize("key, shape", [("layers.2.1.3.weight", (768, 3000)), ("latents", (1, 16, 640)),
                                        ("norm_out.bias", (1024,))])
def test_wrong_shape_is_named(plus_sd15, key, shape):
    image_proj = dict(plus_sd15.image_proj, **{key: torch.zeros(shape, dtype=torch.float16)})
    message = rf"image_proj\['{re.escape(key)}'\] has shape \({', '.join(map(str, shape))},?\)"
    with pytest.raises(ValueError, match=message):
        build_projection(plus_sd15.variant, image_proj)


@pytest.mark.unit
def test_missing_key_and_wrong_variant_are_named(plus_sd15):
    image_proj = {k: v for k, v in plus_sd15.image_proj.items() if k != "layers.1.0.norm2.bias"}
    with pytest.raises(ValueError, match="missing.*'layers.1.0.norm2.bias'"):
        build_projection(plus_sd15.variant, image_proj)
    faceid, portrait = _adapter("ip-adapter-faceid_sd15"), _adapter("ip-adapter-faceid-portrait_sd15")
    with pytest.raises(ValueError, match="faceid_sd15: image_proj takes width 512 to 16 tokens; "
                                         "the variant expects width 512 to 4 tokens"):
        build_projection(faceid.variant, portrait.image_proj)
