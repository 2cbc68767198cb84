"""InstantX's SD3.5 IP-Adapter on the host's MMDiT equals diffusers' SD3IPAdapterJointAttnProcessor2_0.

The host model is an SD3-family MMDiT of 2 joint blocks in Stability's key layout (the host ties the width to the
depth: 128), loaded by the host's own loader; diffusers' SD3Transformer2DModel gets the same weights through the
host's own MMDiT->diffusers key map, and the same adapter (InstantX's published keys, sized to this width) through
diffusers' own ``_load_ip_adapter_weights``, which converts the resampler's keys itself.
"""
from __future__ import annotations

import pytest
import torch

from host_maps import diffusers_state
from tools.comfy_host import pack_module
from tools.factory.dit_models import instantx_sd35_adapter, sd3_transformer

pytestmark = pytest.mark.host

DEPTH, WIDTH = 2, 128
LATENT_HW, TEXT_TOKENS, SIGLIP_TOKENS = (8, 12), 7, 729


def diffusers_twin(model):
    import comfy.utils
    from diffusers import SD3Transformer2DModel
    host_sd = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.mmdit_to_diffusers({"depth": DEPTH, "num_blocks": DEPTH})
    twin = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=DEPTH, attention_head_dim=64,
                                 num_attention_heads=DEPTH, joint_attention_dim=4096, caption_projection_dim=WIDTH,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm")
    twin.load_state_dict(diffusers_state(twin, mapping, host_sd), strict=True)
    return twin.eval()


class SD3:
    def __init__(self):
        import comfy.sd
        self.model = comfy.sd.load_diffusion_model_state_dict(sd3_transformer(DEPTH, 40))
        self.twin = diffusers_twin(self.model)
        self.patch = pack_module("nodes.sd3_patch")
        self.variant = pack_module("ipadapter_core.variants").BY_NAME["instantx_sd35"]
        self.build = pack_module("ipadapter_core.projection").build_projection

    def adapter(self, seed: int):
        groups = instantx_sd35_adapter(seed, DEPTH, WIDTH)
        return {g: {k: v.float() for k, v in sd.items()} for g, sd in groups.items()}

    def spec(self, groups, cond, uncond, weights, sigma_range=None):
        blocks = tuple({k.split(".", 1)[1]: v for k, v in groups["ip_adapter"].items() if k.startswith(f"{i}.")}
                       for i in range(DEPTH))
        return self.patch.TimeConditionedSpec(cond, uncond, self.build(self.variant, groups["image_proj"]), blocks,
                                              tuple(weights), sigma_range)

    def run_host(self, model, x, sigma, context, y, cond_or_uncond):
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                       sigmas=torch.full((1,), sigma))
        t = torch.full((x.shape[0],), sigma * 1000)
        with torch.no_grad():
            return model.model.diffusion_model(x, t, context=context, y=y, transformer_options=options)

    def run_diffusers(self, groups, scales, embeds, x, sigma, context, y):
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        if hasattr(self.twin, "image_proj"):  # an earlier test's: its attention would count as the blocks' processors
            del self.twin.image_proj
        self.twin.set_attn_processor(JointAttnProcessor2_0())
        kwargs = None
        if groups is not None:
            self.twin._load_ip_adapter_weights(groups, low_cpu_mem_usage=False)
            processors = [p for p in self.twin.attn_processors.values() if hasattr(p, "to_k_ip")]
            assert len(processors) == DEPTH
            for processor, scale in zip(processors, scales):
                processor.scale = scale
            kwargs = {"ip_adapter_image_embeds": embeds}
        t = torch.full((x.shape[0],), sigma * 1000)
        with torch.no_grad():
            return self.twin(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                             joint_attention_kwargs=kwargs).sample


@pytest.fixture(scope="module")
def sd3(host):
    return SD3()


def inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, *LATENT_HW, generator=g), torch.randn(batch, TEXT_TOKENS, 4096, generator=g),
            torch.randn(batch, 2048, generator=g), g)


def hidden(g):
    return torch.randn(1, SIGLIP_TOKENS, 1152, generator=g)


def test_plain_models_agree(sd3):
    x, context, y, _ = inputs(1, 0)
    torch.testing.assert_close(sd3.run_host(sd3.model, x, 0.6, context, y, [0]),
                               sd3.run_diffusers(None, None, None, x, 0.6, context, y), rtol=0, atol=1e-4)


@pytest.mark.parametrize("sigma", [1.0, 0.55, 0.05])  # the resampler is conditioned on each step's timestep
def test_one_adapter_with_cfg_matches_diffusers(sd3, sigma):
    x, context, y, g = inputs(2, 1)
    groups = sd3.adapter(11)
    cond, uncond = hidden(g), torch.zeros(1, SIGLIP_TOKENS, 1152)
    patched = sd3.patch.patch_sd3(sd3.model, sd3.spec(groups, cond, uncond, (0.8, 0.8)))
    ours = sd3.run_host(patched, x, sigma, context, y, [1, 0])
    plain = sd3.run_host(sd3.model, x, sigma, context, y, [1, 0])
    theirs = sd3.run_diffusers(groups, (0.8, 0.8), torch.cat([uncond, cond]), x, sigma, context, y)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_per_block_weights_match_diffusers_per_block_scales(sd3):
    x, context, y, g = inputs(2, 2)
    groups = sd3.adapter(21)
    cond, uncond = hidden(g), torch.zeros(1, SIGLIP_TOKENS, 1152)
    patched = sd3.patch.patch_sd3(sd3.model, sd3.spec(groups, cond, uncond, (0.3, 1.4)))
    ours = sd3.run_host(patched, x, 0.7, context, y, [1, 0])
    theirs = sd3.run_diffusers(groups, (0.3, 1.4), torch.cat([uncond, cond]), x, 0.7, context, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    swapped = sd3.run_host(patched, x.flip(0), 0.7, context.flip(0), y.flip(0), [0, 1])
    torch.testing.assert_close(swapped.flip(0), ours, rtol=0, atol=1e-5)  # chosen by the chunk, not its position


def test_outside_its_sigma_range_the_block_is_the_hosts_own(sd3):
    """Gated off (start/end), every joint block gives exactly what the host's block gives: the patch runs the
    host's own pre- and post-attention steps and attention."""
    x, context, y, g = inputs(2, 3)
    groups = sd3.adapter(31)
    cond, uncond = hidden(g), torch.zeros(1, SIGLIP_TOKENS, 1152)
    gated = sd3.patch.patch_sd3(sd3.model, sd3.spec(groups, cond, uncond, (1.0, 1.0), sigma_range=(0.5, 0.2)))
    assert torch.equal(sd3.run_host(gated, x, 0.9, context, y, [1, 0]), sd3.run_host(sd3.model, x, 0.9, context, y, [1, 0]))
    inside = sd3.run_host(gated, x, 0.3, context, y, [1, 0])
    theirs = sd3.run_diffusers(groups, (1.0, 1.0), torch.cat([uncond, cond]), x, 0.3, context, y)
    torch.testing.assert_close(inside, theirs, rtol=0, atol=1e-4)
