"""XLabs' Flux IP-Adapter on the host's Flux transformer equals diffusers' FluxIPAdapterAttnProcessor.

The host model is the factory's FLUX.1-dev layout (real widths, 2 double- and 1 single-stream blocks) loaded by
the host's own diffusion-model loader; diffusers' FluxTransformer2DModel gets the same weights through the host's
own Flux->diffusers key map, and the same adapter file (XLabs' published key layout, written as safetensors)
through diffusers' own ``FluxIPAdapterMixin.load_ip_adapter``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from support.diffusers_twins import flux_twin
from support.flux import LATENT_HW, call_transformer, image_ids, inputs, load_flux, pack, unpack
from tools import factory
from tools.comfy_host import pack_module
from tools.factory import dit_models

pytestmark = pytest.mark.host

CONFIG = dit_models.FLUX_REDUCED


class Flux:
    """The host's Flux model and its diffusers twin, with helpers to patch and run both."""

    def __init__(self, host, models_dir):
        self.model = load_flux(models_dir)
        self.twin = flux_twin(self.model, CONFIG)
        self.loader = pack_module("ipadapter_core.loader")
        self.encode = pack_module("nodes.ipadapter_encode")
        self.apply = pack_module("nodes.ipadapter_apply")
        self.options = pack_module("ipadapter_core.apply_options").ApplyOptions

    def adapter(self, stem: str, seed: int, tmp_path):
        """(our LoadedAdapter, the file's folder) for an XLabs file written as safetensors, as published."""
        folder = tmp_path / f"{stem}-{seed}"
        folder.mkdir()
        path = folder / "ip_adapter.safetensors"
        factory.write_state_dict(dit_models.xlabs_adapter(stem, seed, CONFIG["depth"]), path)
        return self.encode.load(str(path)), folder

    def patch(self, model, adapter, cond_embeds, uncond_embeds, weight, **inputs):
        """``model`` patched as the Apply nodes patch it, from CLIP image_embeds [1, 768]."""
        cond, uncond = self.encode.image_tokens(adapter, cond_embeds, uncond_embeds)
        return self.apply.apply_tokens(model, adapter, cond, uncond, self.options.from_inputs(weight, **inputs))

    def run_host(self, model, x, t, context, y, guidance, cond_or_uncond, sigma=0.5):
        """The host's transformer as its sampler calls it: the patcher's wrappers in the transformer options."""
        return call_transformer(model, x, t, context, y=y, guidance=guidance, cond_or_uncond=cond_or_uncond,
                                sigma=sigma)

    def run_diffusers(self, folders, scales, image_embeds, x, t, context, y, guidance, block_scales=None):
        """diffusers' transformer with these adapters loaded by its own loader; ``block_scales[i]`` (one value per
        adapter) overrides the scales of double-stream block i."""
        from diffusers.loaders.ip_adapter import FluxIPAdapterMixin
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        self.twin.set_attn_processor(FluxAttnProcessor())  # no adapter from an earlier test
        self.twin.encoder_hid_proj = None
        kwargs = None
        if folders:
            FluxIPAdapterMixin.load_ip_adapter(SimpleNamespace(transformer=self.twin), [str(f) for f in folders],
                                               weight_name=["ip_adapter.safetensors"] * len(folders),
                                               image_encoder_pretrained_model_name_or_path=None,
                                               low_cpu_mem_usage=False)
            processors = [p for p in self.twin.attn_processors.values() if hasattr(p, "to_k_ip")]
            assert len(processors) == CONFIG["depth"]  # only the double-stream blocks
            for i, processor in enumerate(processors):
                processor.scale = list(block_scales[i]) if block_scales is not None else list(scales)
            kwargs = {"ip_adapter_image_embeds": image_embeds}
        h, w = x.shape[-2:]
        with torch.no_grad():
            out = self.twin(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=y, timestep=t,
                            img_ids=image_ids(h // 2, w // 2), txt_ids=torch.zeros(context.shape[1], 3),
                            guidance=guidance, joint_attention_kwargs=kwargs).sample
        return unpack(out, h, w)


@pytest.fixture(scope="module")
def flux(host, need_models):
    return Flux(host, need_models(f"diffusion_models/{factory.FLUX_FILE}"))  # before the function-level markers


def embeds(g, count: int = 2):
    return [torch.randn(1, 768, generator=g) for _ in range(count)]


def test_plain_models_agree(flux):
    """The host's map and the random weights give diffusers' very transformer: the baseline of every test here."""
    x, t, context, y, guidance, _ = inputs(1)
    ours = flux.run_host(flux.model, x, t, context, y, guidance, [0])
    theirs = flux.run_diffusers([], [], None, x, t, context, y, guidance)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _rows(*embeds):
    """diffusers' image embeds of one adapter: one [1, 768] per batch row -> [rows, 1 image, 768]."""
    return torch.cat(embeds).unsqueeze(1)


@pytest.mark.parametrize("stem", list(dit_models.XLABS_TOKENS))
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_one_adapter_matches_diffusers_in_flux_single_pass(flux, tmp_path, stem, weight):
    """FLUX.1-dev's guidance-distilled sampling: one cond pass per step."""
    x, t, context, y, guidance, g = inputs(1, 1)
    adapter, folder = flux.adapter(stem, 11, tmp_path)
    assert adapter.file.variant.name == {"flux-ip-adapter": "xlabs_flux", "flux-ip-adapter-v2": "xlabs-v2_flux"}[stem]
    cond, uncond = embeds(g)
    ours = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, weight), x, t, context, y, guidance, [0])
    plain = flux.run_host(flux.model, x, t, context, y, guidance, [0])
    theirs = flux.run_diffusers([folder], [weight], [_rows(cond)], x, t, context, y, guidance)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # the adapter really moved the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_real_cfg_gives_the_negative_side_the_uncond_tokens(flux, tmp_path):
    """True CFG (a negative prompt, cfg > 1): the uncond chunk gets the negative image's tokens."""
    x, t, context, y, guidance, g = inputs(2, 2)
    adapter, folder = flux.adapter("flux-ip-adapter", 21, tmp_path)
    cond, negative = embeds(g)
    patched = flux.patch(flux.model, adapter, cond, negative, 0.8)
    ours = flux.run_host(patched, x, t, context, y, guidance, [1, 0])
    theirs = flux.run_diffusers([folder], [0.8], [_rows(negative, cond)], x, t, context, y, guidance)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    swapped = flux.run_host(patched, x.flip(0), t, context.flip(0), y.flip(0), guidance, [0, 1])
    torch.testing.assert_close(swapped.flip(0), ours, rtol=0, atol=1e-5)  # chosen by the chunk, not its position


def test_per_block_weights_match_diffusers_per_block_scales(flux, tmp_path):
    x, t, context, y, guidance, g = inputs(1, 3)
    adapter, folder = flux.adapter("flux-ip-adapter-v2", 31, tmp_path)
    cond, uncond = embeds(g)
    patched = flux.patch(flux.model, adapter, cond, uncond, 1.2, layer_weights="0:0.25, 1:1")
    ours = flux.run_host(patched, x, t, context, y, guidance, [0])
    theirs = flux.run_diffusers([folder], None, [_rows(cond)], x, t, context, y, guidance,
                                block_scales=[[0.3], [1.2]])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    eased = flux.patch(flux.model, adapter, cond, uncond, 1.2, weight_type="ease out")  # a curve over the blocks
    theirs = flux.run_diffusers([folder], None, [_rows(cond)], x, t, context, y, guidance,
                                block_scales=[[1.2 * 0.05], [1.2 * (0.05 + 0.95 / 2)]])
    torch.testing.assert_close(flux.run_host(eased, x, t, context, y, guidance, [0]), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("stems", [("flux-ip-adapter", "flux-ip-adapter-v2"), ("flux-ip-adapter", "flux-ip-adapter")],
                         ids=["4+16 tokens", "4+4 tokens"])
def test_two_adapters_compose_like_diffusers(flux, tmp_path, stems):
    """Two chained Apply nodes; adapters with equal token counts attend together (one group)."""
    x, t, context, y, guidance, g = inputs(2, 4)
    (first, first_folder), (second, second_folder) = flux.adapter(stems[0], 41, tmp_path), flux.adapter(stems[1], 42,
                                                                                                         tmp_path)
    e1, e2 = embeds(g), embeds(g)
    patched = flux.patch(flux.patch(flux.model, first, *e1, 0.9), second, *e2, 0.5)
    patch = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    assert len(patch.adapters) == 2 and len(patch.groups[0]) == len(set(stems))
    ours = flux.run_host(patched, x, t, context, y, guidance, [1, 0])
    theirs = flux.run_diffusers([first_folder, second_folder], [0.9, 0.5], [_rows(e1[1], e1[0]), _rows(e2[1], e2[0])],
                                x, t, context, y, guidance)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_mask_limits_the_image_to_its_region_of_the_token_grid(flux, tmp_path, monkeypatch):
    """A mask over the left third of a 2:3 latent: diffusers has no Flux masks, so its processor's image term is
    multiplied by the same region of its 4 x 6 token grid (columns 0-1), the only change to diffusers here."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    x, t, context, y, guidance, g = inputs(2, 5)
    adapter, folder = flux.adapter("flux-ip-adapter", 51, tmp_path)
    cond, uncond = embeds(g)
    mask = torch.zeros(1, 48, 72)  # an image-sized mask: any size and aspect ratio maps onto the grid
    mask[:, :, :24] = 1.0
    ours = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, 1.0, attn_mask=mask), x, t, context, y,
                         guidance, [1, 0])
    grid = torch.zeros(LATENT_HW[0] // 2, LATENT_HW[1] // 2)
    grid[:, :2] = 1.0
    call = FluxIPAdapterAttnProcessor.__call__

    @functools.wraps(call)  # diffusers passes a processor the arguments its signature names
    def masked(self, *args, **kwargs):
        image, text, ip = call(self, *args, **kwargs)
        return image, text, ip * grid.reshape(1, -1, 1)
    monkeypatch.setattr(FluxIPAdapterAttnProcessor, "__call__", masked)
    theirs = flux.run_diffusers([folder], [1.0], [_rows(uncond, cond)], x, t, context, y, guidance)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    unmasked = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, 1.0), x, t, context, y, guidance, [1, 0])
    assert (ours - unmasked).abs().max() > 1e-2


def test_weight_zero_is_bit_identical_and_the_input_model_is_untouched(flux, tmp_path):
    x, t, context, y, guidance, g = inputs(1, 6)
    before = flux.run_host(flux.model, x, t, context, y, guidance, [0])
    adapter, _ = flux.adapter("flux-ip-adapter", 61, tmp_path)
    cond, uncond = embeds(g)
    zero = flux.patch(flux.model, adapter, cond, uncond, 0.0)
    assert torch.equal(flux.run_host(zero, x, t, context, y, guidance, [0]), before)
    assert "patches_replace" not in flux.model.model_options["transformer_options"]
    assert not flux.model.wrappers.get("diffusion_model")
    assert torch.equal(flux.run_host(flux.model, x, t, context, y, guidance, [0]), before)
