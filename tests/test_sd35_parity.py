"""InstantX's SD3.5 IP-Adapter on the host's MMDiT equals diffusers' SD3IPAdapterJointAttnProcessor2_0.

The host model is an SD3-family MMDiT of 2 joint blocks in Stability's key layout (the host ties the width to the
depth: 128), loaded by the host's own loader; diffusers' SD3Transformer2DModel gets the same weights through the
host's own MMDiT->diffusers key map, and the same adapter (InstantX's published keys, sized to this width) through
diffusers' own ``_load_ip_adapter_weights``, which converts the resampler's keys itself. diffusers' SD3 adapter has
neither masks nor several adapters at once: ``SummedAdapters`` gives each block diffusers' own processors, one per
adapter, and adds their terms (masked on the token grid) to the plain attention.
"""
from __future__ import annotations

import pytest
import torch

from support.context_windows import context_window
from support.diffusers_twins import diffusers_state
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
        self.patch = pack_module("nodes.patch.sd35")
        self.variant = pack_module("ipadapter_core.variants").BY_NAME["instantx_sd35"]
        self.build = pack_module("ipadapter_core.projection").build_projection

    def adapter(self, seed: int):
        groups = instantx_sd35_adapter(seed, DEPTH, WIDTH)
        return {g: {k: v.float() for k, v in sd.items()} for g, sd in groups.items()}

    def spec(self, groups, cond, uncond, weights, sigma_range=None, mask=None, image_weights=()):
        blocks = tuple({k.split(".", 1)[1]: v for k, v in groups["ip_adapter"].items() if k.startswith(f"{i}.")}
                       for i in range(DEPTH))
        return self.patch.TimeConditionedSpec(cond, uncond, self.build(self.variant, groups["image_proj"]), blocks,
                                              tuple(weights), sigma_range, mask, image_weights)

    def run_host(self, model, x, sigma, context, y, cond_or_uncond):
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                       sigmas=torch.full((1,), sigma))
        t = torch.full((x.shape[0],), sigma * 1000)
        with torch.no_grad():
            return model.model.diffusion_model(x, t, context=context, y=y, transformer_options=options)

    def run_host_with_wrappers(self, model, x, sigma, context, y, cond_or_uncond):
        """The transformer's output as the sampler gets it: through the host's apply_model, with the patcher's
        wrappers (the denoised latent x - sigma * output, turned back into the output)."""
        sigmas = torch.full((1,), sigma)
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond, sigmas=sigmas,
                       wrappers=model.wrappers)
        with torch.no_grad():
            denoised = model.model.apply_model(x, sigmas.expand(x.shape[0]), c_crossattn=context, y=y,
                                               transformer_options=options)
        return (x - denoised) / sigma

    def plain_processors(self):
        """diffusers' plain joint attention in every block, and no image projection (an earlier run's: its
        attention would count as the blocks' processors when the next adapter loads)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        if hasattr(self.twin, "image_proj"):
            del self.twin.image_proj
        self.twin.set_attn_processor(JointAttnProcessor2_0())

    def run_diffusers(self, groups, scales, embeds, x, sigma, context, y):
        self.plain_processors()
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


    def run_diffusers_summed(self, adapters, x, sigma, context, y):
        """diffusers' transformer with ``adapters`` [(groups, per-block scales, embeds [B, N, E], factor of the image
        rows, [B or 1, N or 1, 1], or None)] loaded one by one by its own loader and summed by ``SummedAdapters``."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        t = torch.full((x.shape[0],), sigma * 1000)
        per_block = [[] for _ in range(DEPTH)]
        for groups, scales, embeds, factor in adapters:
            self.plain_processors()
            self.twin._load_ip_adapter_weights(groups, low_cpu_mem_usage=False)
            with torch.no_grad():
                tokens, temb = self.twin.image_proj(embeds, t)
            processors = [p for p in self.twin.attn_processors.values() if hasattr(p, "to_k_ip")]
            for parts, processor, scale in zip(per_block, processors, scales):
                processor.scale = scale
                parts.append((processor, tokens, temb, factor))
        del self.twin.image_proj
        names = list(self.twin.attn_processors)
        self.twin.set_attn_processor({name: SummedAdapters(JointAttnProcessor2_0(), parts)
                                      for name, parts in zip(names, per_block)})
        with torch.no_grad():
            return self.twin(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t).sample


class SummedAdapters:
    """A diffusers joint-attention processor: the plain joint attention plus, for each adapter, the output of
    diffusers' SD3IPAdapterJointAttnProcessor2_0 minus the plain output, times the adapter's factor of each image
    row (a mask on the token grid, a weight per batch row). The image term enters before the attention's output
    projection, a linear map of each row on its own, so such factors and a sum over adapters pass through it."""

    def __init__(self, plain, parts):
        self.plain = plain
        self.parts = parts  # [(processor, tokens, temb, factor [B or 1, N or 1, 1] or None)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        base, context = self.plain(attn, hidden_states, encoder_hidden_states)
        out = base
        for processor, tokens, temb, factor in self.parts:
            with_image, _ = processor(attn, hidden_states, encoder_hidden_states, ip_hidden_states=tokens, temb=temb)
            out = out + (with_image - base) * (1.0 if factor is None else factor)
        return out, context


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
    patched = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond, uncond, (0.8, 0.8)))
    ours = sd3.run_host(patched, x, sigma, context, y, [1, 0])
    plain = sd3.run_host(sd3.model, x, sigma, context, y, [1, 0])
    theirs = sd3.run_diffusers(groups, (0.8, 0.8), torch.cat([uncond, cond]), x, sigma, context, y)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_per_block_weights_match_diffusers_per_block_scales(sd3):
    x, context, y, g = inputs(2, 2)
    groups = sd3.adapter(21)
    cond, uncond = hidden(g), torch.zeros(1, SIGLIP_TOKENS, 1152)
    patched = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond, uncond, (0.3, 1.4)))
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
    gated = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond, uncond, (1.0, 1.0), sigma_range=(0.5, 0.2)))
    assert torch.equal(sd3.run_host(gated, x, 0.9, context, y, [1, 0]), sd3.run_host(sd3.model, x, 0.9, context, y, [1, 0]))
    inside = sd3.run_host(gated, x, 0.3, context, y, [1, 0])
    theirs = sd3.run_diffusers(groups, (1.0, 1.0), torch.cat([uncond, cond]), x, 0.3, context, y)
    torch.testing.assert_close(inside, theirs, rtol=0, atol=1e-4)


def test_two_adapters_one_masked_match_diffusers_summed(sd3):
    """Two adapters at once, the second limited by an image-sized mask to the left third of a 2:3 latent (columns
    0-1 of its 4 x 6 token grid), with CFG: the sum of diffusers' two processors, the second's term masked."""
    x, context, y, g = inputs(2, 4)
    first, second = sd3.adapter(41), sd3.adapter(42)
    cond1, cond2, uncond = hidden(g), hidden(g), torch.zeros(1, SIGLIP_TOKENS, 1152)
    mask = torch.zeros(1, 48, 72)
    mask[:, :, :24] = 1.0
    model = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(first, cond1, uncond, (0.7, 0.7)))
    model = sd3.patch.patch_sd35_joint_blocks(model, sd3.spec(second, cond2, uncond, (0.5, 1.2), mask=mask))
    ours = sd3.run_host_with_wrappers(model, x, 0.6, context, y, [1, 0])
    grid = torch.zeros(LATENT_HW[0] // 2, LATENT_HW[1] // 2)
    grid[:, :2] = 1.0
    theirs = sd3.run_diffusers_summed([(first, (0.7, 0.7), torch.cat([uncond, cond1]), None),
                                       (second, (0.5, 1.2), torch.cat([uncond, cond2]), grid.reshape(1, -1, 1))],
                                      x, 0.6, context, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    unmasked = sd3.patch.patch_sd35_joint_blocks(sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(first, cond1, uncond, (0.7, 0.7))),
                                   sd3.spec(second, cond2, uncond, (0.5, 1.2)))
    assert (sd3.run_host_with_wrappers(unmasked, x, 0.6, context, y, [1, 0]) - ours).abs().max() > 100 * (
        ours - theirs).abs().max()
    assert not sd3.model.wrappers.get("apply_model")  # the input model is untouched


def test_an_unfolded_batch_with_a_weight_per_image_matches_diffusers(sd3):
    """Two references unfolded over two latents (latent i sees image i) with the weights 0.9 and 0.3, under CFG:
    diffusers' processor on the rows [uncond 0, uncond 1, cond 0, cond 1], each row's term scaled by its weight."""
    x, context, y, g = inputs(4, 5)
    groups = sd3.adapter(51)
    cond, uncond = torch.cat([hidden(g), hidden(g)]), torch.zeros(2, SIGLIP_TOKENS, 1152)
    patched = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond, uncond, (1.0, 1.0), image_weights=(0.9, 0.3)))
    ours = sd3.run_host(patched, x, 0.5, context, y, [1, 0])
    rows = torch.tensor([0.9, 0.3, 0.9, 0.3])[:, None, None]
    theirs = sd3.run_diffusers_summed([(groups, (1.0, 1.0), torch.cat([uncond, cond]), rows)], x, 0.5, context, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    first_only = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond[:1], uncond[:1], (1.0, 1.0)))
    assert (sd3.run_host(first_only, x, 0.5, context, y, [1, 0]) - ours)[[1, 3]].abs().max() > 1e-2


def test_an_unfolded_batch_on_a_window_of_the_frames_equals_one_pass(sd3):
    """Four references unfolded over four frames with a weight each, under CFG: the transformer run on a window of
    the frames (the host's context window in the options; its anchor frame first where the host slices one, as
    0.28's causal_window_fix does) gives each of its rows what one pass over the whole batch gives that frame."""
    x, context, y, g = inputs(8, 6)  # rows: uncond frames 0-3, cond frames 0-3
    cond, uncond = torch.cat([hidden(g) for _ in range(4)]), torch.zeros(4, SIGLIP_TOKENS, 1152)
    groups = sd3.adapter(52)
    patched = sd3.patch.patch_sd35_joint_blocks(sd3.model, sd3.spec(groups, cond, uncond, (1.0, 1.0),
                                                      image_weights=(0.9, 0.3, 1.2, 0.6)))
    whole = sd3.run_host(patched, x, 0.5, context, y, [1, 0])
    window = context_window([2, 3], total=4)
    window.causal_anchor_index = 1  # the frame a host with causal_window_fix puts first; older hosts ignore it
    frames = window.get_tensor(torch.arange(4)).tolist()
    rows = torch.tensor([chunk * 4 + f for chunk in range(2) for f in frames])
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0],
                   sigmas=torch.full((1,), 0.5), context_window=window)
    with torch.no_grad():
        in_window = patched.model.diffusion_model(x[rows], torch.full((len(rows),), 500.0), context=context[rows],
                                                  y=y[rows], transformer_options=options)
    torch.testing.assert_close(in_window, whole[rows], rtol=0, atol=1e-5)
