"""Our decoupled cross-attention inside the host's UNet equals diffusers' IP-Adapter with the same weights.

The host model comes from a factory checkpoint through CheckpointLoaderSimple; diffusers'
UNet2DConditionModel gets the same weights through the host's own LDM->diffusers key map, and the same
adapter file through diffusers' own IP-Adapter loader (``_load_ip_adapter_weights``).
"""
from __future__ import annotations

import pytest
import torch

from support.attention_forms import FORMS, forced_plan
from support.diffusers_twins import TINY_DIFFUSERS, diffusers_twin
from tools import factory
from tools.comfy_host import pack_module
from tools.factory.ipadapters import BY_STEM, adapter_state_dict

pytestmark = pytest.mark.host

SD15_DIFFUSERS = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def embeds_for(variant, generator, batch=1):
    """Random CLIP outputs of the kind this variant reads: pooled [B, E] or penultimate [B, 257, E]."""
    if variant.encoder_output == "image_embeds":
        return torch.randn(batch, variant.embed_dim, generator=generator)
    return torch.randn(batch, 257, variant.embed_dim, generator=generator)


class Setup:
    """One host model and its diffusers twin, plus helpers to patch and run both."""

    def __init__(self, host, checkpoint: str, config: dict, widths):
        self.host = host
        self.model = host.CheckpointLoaderSimple().load_checkpoint(checkpoint)[0]
        self.twin = diffusers_twin(self.model, config)
        self.widths = widths
        self.loader = pack_module("ipadapter_core.loader")
        self.projection = pack_module("ipadapter_core.projection")
        self.attention = pack_module("ipadapter_core.attention")
        self.patch = pack_module("nodes.patch")

    def adapter(self, stem: str, seed: int, tmp_path):
        """(our AdapterFile, its fp32 grouped state dict) for a factory layout over this UNet's widths."""
        groups = adapter_state_dict(BY_STEM[stem], seed, self.widths)
        path = tmp_path / f"{stem}-{seed}.bin"
        factory.write_state_dict(groups, path)
        return self.loader.load_adapter(path), {g: {k: v.float() for k, v in sd.items()} for g, sd in groups.items()}

    def spec(self, adapter, cond_embeds, uncond_embeds, weight):
        proj = self.projection.build_projection(adapter.variant, adapter.image_proj)
        with torch.no_grad():
            cond, uncond = proj(cond_embeds), proj(uncond_embeds)
        ids = range(1, 2 * len(adapter.layer_widths), 2)
        return pack_module("ipadapter_core.adapter_spec").AdapterSpec(cond.reshape(1, -1, cond.shape[-1]), uncond.reshape(1, -1, cond.shape[-1]),
                                          tuple(adapter.ip_adapter[f"{i}.to_k_ip.weight"].float() for i in ids),
                                          tuple(adapter.ip_adapter[f"{i}.to_v_ip.weight"].float() for i in ids),
                                          (weight,) * len(adapter.layer_widths))

    def node_spec(self, adapter, cond_embeds, uncond_embeds, weight, **options):
        """The spec the Apply nodes build (weight types, sigma range, mask, embeds scaling)."""
        loaded = pack_module("nodes.ipadapter_encode").LoadedAdapter(
            adapter, self.projection.build_projection(adapter.variant, adapter.image_proj))
        with torch.no_grad():
            cond, uncond = loaded.projection(cond_embeds), loaded.projection(uncond_embeds)
        width = cond.shape[-1]
        return pack_module("nodes.ipadapter_apply").adapter_spec(
            self.model, loaded, cond.reshape(1, -1, width), uncond.reshape(1, -1, width), apply_options(weight, **options))

    def stack_plus(self, entries, generator, tmp_path):
        """This model patched with one plus adapter per (seed, weight, node options) entry, through the Apply
        nodes' spec; and per adapter, diffusers' (state dict, weight, image embeds, mask: all ones if none)."""
        patched, twins = self.model, []
        for seed, weight, options in entries:
            adapter, state = self.adapter("ip-adapter-plus_sd15", seed, tmp_path)
            cond, uncond = embeds_for(adapter.variant, generator), embeds_for(adapter.variant, generator)
            patched = self.patch.patch_model(patched, adapter, self.node_spec(adapter, cond, uncond, weight, **options))
            mask = options.get("attn_mask", torch.ones(1, 8, 8))
            twins.append((state, weight, _diffusers_embeds(adapter.variant, uncond, cond), mask[None]))
        return patched, twins

    def run_host(self, model, x, t, context, cond_or_uncond, sigma=1.0):
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                       sigmas=torch.tensor([sigma]))
        with torch.no_grad():
            return model.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    def run_diffusers(self, state_dicts, weights, image_embeds, x, t, context, layer_scales=None, masks=None):
        """diffusers' UNet with its IP-Adapter processors; ``layer_scales[i]`` overrides the scale of
        the i-th cross-attention processor (diffusers' own per-layer scale, as InstantStyle sets it)."""
        self.twin._load_ip_adapter_weights(state_dicts)
        cross = [p for p in self.twin.attn_processors.values() if hasattr(p, "scale")]
        for i, processor in enumerate(cross):
            processor.scale = [layer_scales[i]] if layer_scales is not None else list(weights)
        kwargs = {"ip_adapter_masks": masks} if masks is not None else None
        with torch.no_grad():
            return self.twin(x, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs,
                             added_cond_kwargs={"image_embeds": image_embeds}).sample


@pytest.fixture(scope="module")
def tiny(host, need_models):
    need_models("checkpoints/tiny_sd15.ckpt")
    return Setup(host, "tiny_sd15.ckpt", TINY_DIFFUSERS, factory.TINY_SD15_WIDTHS)


def apply_options(weight, **inputs):
    """The ApplyOptions an apply node makes of these inputs."""
    return pack_module("ipadapter_core.apply_options").ApplyOptions.from_inputs(weight, **inputs)


def force_form(tiny, monkeypatch, form: str):
    """Run the image attention in ``form`` whatever the device and token count: the CPU's forms and the GPU's
    ("extra heads") all run here, where only the CPU's would be chosen."""
    plan = forced_plan(pack_module("ipadapter_core.attention_forms"), form)
    monkeypatch.setattr(tiny.attention, "attention_plan", lambda device_type, tokens, upcast: plan)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([421.0, 421.0]), torch.randn(2, 77, 768, generator=g), g


def _diffusers_embeds(variant, uncond, cond):
    """diffusers batches image embeds per adapter as [batch, images, ...]: here [uncond; cond] with one image."""
    return torch.cat([uncond, cond]).unsqueeze(1)


@pytest.mark.parametrize("stem", ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-full-face_sd15",
                                  "ip-adapter_sd15_vit-G"])
@pytest.mark.parametrize("weight", [1.0, 0.35])
@pytest.mark.parametrize("form", FORMS[1:])  # extra heads is per adapter for one adapter
def test_one_adapter_matches_diffusers(tiny, tmp_path, monkeypatch, stem, weight, form):
    force_form(tiny, monkeypatch, form)
    x, t, context, g = inputs()
    adapter, state = tiny.adapter(stem, 11, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    patched = tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, weight))
    ours = tiny.run_host(patched, x, t, context, cond_or_uncond=[1, 0])  # uncond rows first, as diffusers
    plain = tiny.run_host(tiny.model, x, t, context, cond_or_uncond=[1, 0])
    theirs = tiny.run_diffusers([state], [weight], [_diffusers_embeds(adapter.variant, uncond, cond)], x, t, context)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # the adapter really moved the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_two_adapters_compose_like_diffusers(tiny, tmp_path):
    x, t, context, g = inputs(1)
    first, first_state = tiny.adapter("ip-adapter_sd15", 21, tmp_path)
    second, second_state = tiny.adapter("ip-adapter-plus_sd15", 22, tmp_path)
    e1 = embeds_for(first.variant, g), embeds_for(first.variant, g)
    e2 = embeds_for(second.variant, g), embeds_for(second.variant, g)
    once = tiny.patch.patch_model(tiny.model, first, tiny.spec(first, *e1, 0.8))
    twice = tiny.patch.patch_model(once, second, tiny.spec(second, *e2, 0.6))
    ours = tiny.run_host(twice, x, t, context, cond_or_uncond=[1, 0])
    theirs = tiny.run_diffusers([first_state, second_state], [0.8, 0.6],
                                [_diffusers_embeds(first.variant, e1[1], e1[0]),
                                 _diffusers_embeds(second.variant, e2[1], e2[0])], x, t, context)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_adapters_with_equal_token_counts_run_as_extra_heads_like_diffusers(tiny, tmp_path, monkeypatch, form):
    """Three plus adapters in one group (one attention call as extra heads, or one product): masks per adapter,
    one gated by sigma (diffusers has no sigma range: at an early sigma the gated adapter is off, so diffusers
    runs without it)."""
    force_form(tiny, monkeypatch, form)
    x, t, context, g = inputs(12)
    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[:, :, :4], right[:, :, 4:] = 1.0, 1.0
    patched, twins = tiny.stack_plus([(121, 0.7, {"attn_mask": left}), (122, 0.5, {"attn_mask": right, "start_at": 0.5}),
                                      (123, 0.9, {})], g, tmp_path)
    layer = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    assert set(layer.groups.values()) == {((0, 1, 2),)}  # one attention call at every layer

    sampling = tiny.model.get_model_object("model_sampling")
    for sigma, active in ((float(sampling.sigma_max), (0, 2)), (float(sampling.sigma_min), (0, 1, 2))):
        ours = tiny.run_host(patched, x, t, context, [1, 0], sigma=sigma)
        states, weights, embeds, masks = map(list, zip(*(twins[i] for i in active)))
        theirs = tiny.run_diffusers(states, weights, embeds, x, t, context, masks=masks)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn_precision, form", [(None, f) for f in FORMS] + [(torch.float32, "extra heads")],
                         ids=FORMS + ["fp32-attention"])
def test_half_precision_adds_no_error_beyond_the_unets_own(tiny, tmp_path, monkeypatch, dtype, attn_precision, form):
    """The UNet in fp16/bf16 (as on GPUs; ``attn_precision`` fp32 is the models that upcast attention, which
    never take the matrix products), two plus adapters in one group, one masked: the patched UNet is as close
    to diffusers' fp32 result as the plain UNet is to its own fp32 result, and the adapters' effect is intact."""
    import copy
    force_form(tiny, monkeypatch, form)
    x, t, context, g = inputs(13)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1.0
    patched, twins = tiny.stack_plus([(131, 1.0, {}), (132, 0.6, {"attn_mask": mask})], g, tmp_path)
    unet = copy.deepcopy(tiny.model.model.diffusion_model).to(dtype)
    unet.dtype = dtype  # what the host sets when it loads a model in this dtype
    for module in unet.modules():
        if hasattr(module, "attn_precision"):
            module.attn_precision = attn_precision

    def run_half(model):
        options = dict(model.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
        return unet(x.to(dtype), timesteps=t, context=context.to(dtype), transformer_options=options).float()
    ours, plain = run_half(patched), run_half(tiny.model)
    states, weights, embeds, masks = map(list, zip(*twins))
    theirs = tiny.run_diffusers(states, weights, embeds, x, t, context, masks=masks)
    plain_error = (plain - tiny.run_host(tiny.model, x, t, context, [1, 0])).abs().max()
    effect = (theirs - tiny.run_host(tiny.model, x, t, context, [1, 0])).abs().max()
    assert (ours - theirs).abs().max() <= 2 * plain_error
    assert effect > 10 * plain_error  # the comparison resolves the adapters
    assert (ours - plain).abs().max() > 0.5 * effect


def test_batch_layout_follows_cond_or_uncond(tiny, tmp_path):
    """Cond-first batches get the cond tokens in the first chunk: same rows as the uncond-first run, swapped."""
    x, t, context, g = inputs(2)
    adapter, _ = tiny.adapter("ip-adapter-plus_sd15", 31, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    patched = tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, 1.0))
    uncond_first = tiny.run_host(patched, x, t, context, cond_or_uncond=[1, 0])
    cond_first = tiny.run_host(patched, x.flip(0), t, context.flip(0), cond_or_uncond=[0, 1])
    torch.testing.assert_close(cond_first.flip(0), uncond_first, rtol=0, atol=1e-5)


def test_weight_zero_is_bit_identical_and_the_input_model_is_untouched(tiny, tmp_path):
    x, t, context, g = inputs(3)
    before = tiny.run_host(tiny.model, x, t, context, cond_or_uncond=[1, 0])
    adapter, _ = tiny.adapter("ip-adapter_sd15", 41, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    zero = tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, 0.0))
    assert torch.equal(tiny.run_host(zero, x, t, context, cond_or_uncond=[1, 0]), before)
    strong = tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, 2.0))
    assert not torch.equal(tiny.run_host(strong, x, t, context, cond_or_uncond=[1, 0]), before)
    assert "patches_replace" not in tiny.model.model_options["transformer_options"]
    assert torch.equal(tiny.run_host(tiny.model, x, t, context, cond_or_uncond=[1, 0]), before)


# The tiny UNet's cross-attention layers in file order (input 1, output 0, output 1, middle) sit in attention
# blocks 0, 2, 3 and 1 of its 4 (execution order: input, middle, output).
TINY_BLOCKS = (0, 2, 3, 1)


def test_per_layer_weights_match_diffusers_per_layer_scales(tiny, tmp_path):
    x, t, context, g = inputs(6)
    adapter, state = tiny.adapter("ip-adapter-plus_sd15", 61, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    spec = tiny.node_spec(adapter, cond, uncond, 1.5, weight_type="ease in")
    ours = tiny.run_host(tiny.patch.patch_model(tiny.model, adapter, spec), x, t, context, [1, 0])
    expected = [1.5 * (0.05 + 0.95 * (1 - b / 4)) for b in TINY_BLOCKS]  # ease in over 4 attention blocks
    assert list(spec.layer_weights) == pytest.approx(expected)
    theirs = tiny.run_diffusers([state], None, [_diffusers_embeds(adapter.variant, uncond, cond)], x, t, context,
                                layer_scales=expected)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("form", FORMS[1:])
def test_attention_mask_matches_diffusers_masks(tiny, tmp_path, monkeypatch, form):
    """A mask over half the image: on the CPU's forms only the rows it covers are attended (gathered and added back)."""
    force_form(tiny, monkeypatch, form)
    x, t, context, g = inputs(7)
    adapter, state = tiny.adapter("ip-adapter_sd15", 71, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    spec = tiny.node_spec(adapter, cond, uncond, 1.0, attn_mask=mask)
    patched = tiny.patch.patch_model(tiny.model, adapter, spec)
    ours = tiny.run_host(patched, x, t, context, [1, 0])
    layer = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    covered = {grid.tokens: len(rows) for grid, rows in layer.factors._masked.items() if rows is not None}
    assert covered and all(2 * rows == tokens for tokens, rows in covered.items())  # the mask's half, per layer
    unmasked = tiny.run_host(tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, 1.0)),
                             x, t, context, [1, 0])
    theirs = tiny.run_diffusers([state], [1.0], [_diffusers_embeds(adapter.variant, uncond, cond)], x, t, context,
                                masks=[mask[None]])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("form", FORMS)
def test_masks_per_frame_match_diffusers_masks_per_batch_row(tiny, tmp_path, monkeypatch, form):
    """Two plus adapters (one attention group) over three frames (latents) per chunk: the first with two masks
    (frame 0 the first, frames 1 and 2 the last), the second with three; diffusers takes one mask per batch row.
    Together they cover half the image (on the CPU's forms only those rows are attended)."""
    force_form(tiny, monkeypatch, form)
    g = torch.Generator().manual_seed(13)
    x, t, context = torch.randn(6, 4, 8, 8, generator=g), torch.full((6,), 421.0), torch.randn(6, 77, 768, generator=g)
    frames = torch.zeros(2, 8, 8)
    frames[0, :, :2] = 1.0
    frames[1, :, 2:4] = 0.7
    corners = torch.zeros(3, 8, 8)
    corners[:2, :4, :4] = 1.0
    corners[2, 4:, :4] = 1.0

    adapters = [tiny.adapter("ip-adapter-plus_sd15", seed, tmp_path) for seed in (131, 132)]
    references = [(embeds_for(a.variant, g), embeds_for(a.variant, g)) for a, _ in adapters]

    def stacked(first_masks):
        patched, twins = tiny.model, []
        for (adapter, state), (cond, uncond), weight, mask in zip(adapters, references, (1.0, 0.6),
                                                                  (first_masks, corners)):
            patched = tiny.patch.patch_model(patched, adapter, tiny.node_spec(adapter, cond, uncond, weight,
                                                                             attn_mask=mask))
            embeds = torch.cat([uncond.expand(3, -1, -1), cond.expand(3, -1, -1)]).unsqueeze(1)  # one per row
            per_row = mask[torch.tensor([0, 1, 2, 0, 1, 2]).clamp(max=len(mask) - 1)]
            twins.append((state, weight, embeds, per_row[:, None]))
        return patched, twins

    patched, twins = stacked(frames)
    ours = tiny.run_host(patched, x, t, context, [1, 0])  # rows: uncond frames 0, 1, 2; cond frames 0, 1, 2
    layer = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    covered = {grid.tokens: len(rows) for grid, rows in layer.factors._masked.items() if rows is not None}
    assert form == "extra heads" or covered and all(2 * rows == tokens for tokens, rows in covered.items())
    states, weights, embeds, masks = zip(*twins)
    theirs = tiny.run_diffusers(list(states), list(weights), list(embeds), x, t, context, masks=list(masks))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    first_mask_only = tiny.run_host(stacked(frames[:1])[0], x, t, context, [1, 0])
    torch.testing.assert_close(first_mask_only[[0, 3]], ours[[0, 3]], rtol=0, atol=1e-6)  # frame 0: its own mask
    assert (first_mask_only[[1, 2, 4, 5]] - ours[[1, 2, 4, 5]]).abs().max() > 1e-3


def test_start_and_end_gate_the_adapter_by_sigma(tiny, tmp_path):
    x, t, context, g = inputs(8)
    adapter, _ = tiny.adapter("ip-adapter_sd15", 81, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    gated = tiny.patch.patch_model(tiny.model, adapter, tiny.node_spec(adapter, cond, uncond, 1.0, start_at=0.5))
    always = tiny.patch.patch_model(tiny.model, adapter, tiny.spec(adapter, cond, uncond, 1.0))
    sampling = tiny.model.get_model_object("model_sampling")
    early, late = float(sampling.sigma_max), float(sampling.sigma_min)
    plain = tiny.run_host(tiny.model, x, t, context, [1, 0], sigma=early)
    assert torch.equal(tiny.run_host(gated, x, t, context, [1, 0], sigma=early), plain)
    torch.testing.assert_close(tiny.run_host(gated, x, t, context, [1, 0], sigma=late),
                               tiny.run_host(always, x, t, context, [1, 0], sigma=late), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"start_at \(0.7\) must be below end_at \(0.2\)"):
        tiny.node_spec(adapter, cond, uncond, 1.0, start_at=0.7, end_at=0.2)


def test_the_cpu_skips_an_adapter_outside_its_sigma_range(tiny, tmp_path, monkeypatch):
    """On the CPU the gate is read back (no GPU sync to avoid): outside the range no image attention runs at all."""
    x, t, context, g = inputs(9)
    adapter, _ = tiny.adapter("ip-adapter-plus_sd15", 91, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    gated = tiny.patch.patch_model(tiny.model, adapter, tiny.node_spec(adapter, cond, uncond, 1.0, end_at=0.5))
    forms = []
    for form in pack_module("ipadapter_core.attention_forms").FORMS:
        monkeypatch.setattr(form, "add", lambda *args, add=form.add, name=form.name: forms.append(name) or add(*args))
    sampling = tiny.model.get_model_object("model_sampling")
    tiny.run_host(gated, x, t, context, [1, 0], sigma=float(sampling.sigma_min))
    assert forms == []
    tiny.run_host(gated, x, t, context, [1, 0], sigma=float(sampling.sigma_max))
    assert set(forms) == {"head products"} and len(forms) == len(TINY_BLOCKS)


def test_embeds_scaling_modes_follow_their_definitions(tiny, tmp_path):
    """At C = 320 the C penalty is 320/1280, so weight 4 with a penalty mode is weight 1 on K and V."""
    x, t, context, g = inputs(9)
    adapter, _ = tiny.adapter("ip-adapter-plus_sd15", 91, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)

    def run(weight, scaling):
        spec = tiny.node_spec(adapter, cond, uncond, weight, embeds_scaling=scaling)
        return tiny.run_host(tiny.patch.patch_model(tiny.model, adapter, spec), x, t, context, [1, 0])
    v_only = run(1.0, "V only")
    torch.testing.assert_close(run(1.0, "K+V"), v_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(4.0, "K+V w/ C penalty"), v_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(4.0, "K+mean(V) w/ C penalty"), v_only, rtol=0, atol=1e-6)
    assert (run(2.0, "K+V") - run(2.0, "V only")).abs().max() > 1e-4  # scaling K changes the softmax


def test_sdxl_adapter_on_sd15_model_names_both(tiny, need_models):
    models = need_models("ipadapter/ip-adapter_sdxl.bin")
    adapter = tiny.loader.load_adapter(models / "ipadapter/ip-adapter_sdxl.bin")
    with pytest.raises(ValueError, match=r"ip-adapter_sdxl.bin is a SDXL IP-Adapter \(70 cross-attention layers, "
                                         r"context width 2048\) but the model is an SD1.5 UNet \(4 cross-attention"):
        tiny.patch.model_fit(tiny.model, adapter)


@pytest.mark.heavy
@pytest.mark.models("checkpoints/sd15_layout.ckpt")
@pytest.mark.parametrize("stem", ["ip-adapter_sd15", "ip-adapter-plus_sd15"])
def test_real_sd15_layout_matches_diffusers(host, tmp_path, stem):
    """The real 16-layer file layout on the full SD1.5 topology: ids 1-29 input/output, 31 the middle block."""
    full = Setup(host, "sd15_layout.ckpt", SD15_DIFFUSERS, None)
    x, t, context, g = inputs(5)
    adapter, state = full.adapter(stem, 51, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    patched = full.patch.patch_model(full.model, adapter, full.spec(adapter, cond, uncond, 1.0))
    ours = full.run_host(patched, x, t, context, cond_or_uncond=[1, 0])
    plain = full.run_host(full.model, x, t, context, cond_or_uncond=[1, 0])
    theirs = full.run_diffusers([state], [1.0], [_diffusers_embeds(adapter.variant, uncond, cond)], x, t, context)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_unfolded_batch_gives_each_latent_its_image_like_diffusers(tiny, tmp_path):
    """unfold_batch: latent i of each chunk gets image i; diffusers takes one image per batch row."""
    g = torch.Generator().manual_seed(10)
    x, t, context = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 421.0), torch.randn(4, 77, 768, generator=g)
    adapter, state = tiny.adapter("ip-adapter-plus_sd15", 101, tmp_path)
    encode, apply = pack_module("nodes.ipadapter_encode"), pack_module("nodes.ipadapter_apply")
    loaded = encode.LoadedAdapter(adapter, tiny.projection.build_projection(adapter.variant, adapter.image_proj))
    cond, uncond = embeds_for(adapter.variant, g, 2), embeds_for(adapter.variant, g, 2)
    tokens = encode.image_tokens(loaded, cond, uncond, unfold=True)
    assert tokens[0].shape[0] == 2
    patched = tiny.patch.patch_model(tiny.model, adapter, apply.adapter_spec(tiny.model, loaded, *tokens,
                                                                             apply_options(1.0)))
    ours = tiny.run_host(patched, x, t, context, cond_or_uncond=[1, 0])  # rows: uncond 0, 1; cond 0, 1
    theirs = tiny.run_diffusers([state], [1.0], [torch.cat([uncond, cond]).unsqueeze(1)], x, t, context)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # one weight per image: rows of image 0 as diffusers at scale 0.3, rows of image 1 at 1.2
    weighted = apply.adapter_spec(tiny.model, loaded, *tokens, apply_options([0.3, 1.2]))
    ours = tiny.run_host(tiny.patch.patch_model(tiny.model, adapter, weighted), x, t, context, cond_or_uncond=[1, 0])
    embeds = [torch.cat([uncond, cond]).unsqueeze(1)]
    low = tiny.run_diffusers([state], [0.3], embeds, x, t, context)
    high = tiny.run_diffusers([state], [1.2], embeds, x, t, context)
    torch.testing.assert_close(ours[[0, 2]], low[[0, 2]], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[[1, 3]], high[[1, 3]], rtol=0, atol=1e-4)


def test_written_block_weights_match_diffusers_per_layer_scales(tiny, tmp_path):
    x, t, context, g = inputs(11)
    adapter, state = tiny.adapter("ip-adapter_sd15", 111, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    spec = tiny.node_spec(adapter, cond, uncond, 2.0, layer_weights="0:1.0, 2:0.25")
    expected = [2.0 * {0: 1.0, 2: 0.25}.get(b, 0.0) for b in TINY_BLOCKS]
    assert list(spec.layer_weights) == expected
    ours = tiny.run_host(tiny.patch.patch_model(tiny.model, adapter, spec), x, t, context, [1, 0])
    theirs = tiny.run_diffusers([state], None, [_diffusers_embeds(adapter.variant, uncond, cond)], x, t, context,
                                layer_scales=expected)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"layer_weights: '7:1' is not 'index:weight' with an attention block index "
                                         r"0..3"):
        tiny.node_spec(adapter, cond, uncond, 1.0, layer_weights="7:1")


SDXL_DIFFUSERS = dict(sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                      attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.mark.heavy
@pytest.mark.models("checkpoints/sdxl_layout.ckpt")
@pytest.mark.parametrize("stem", ["ip-adapter-plus_sdxl_vit-h"])
def test_real_sdxl_layout_matches_diffusers(host, tmp_path, stem):
    """The 70-layer SDXL file layout on the full SDXL topology (middle block id 139). The diffusers twin
    shares the host's weight tensors (one copy of the 2.6 B parameters)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    model = host.CheckpointLoaderSimple().load_checkpoint("sdxl_layout.ckpt")[0]
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    host_sd = model.model.diffusion_model.state_dict()
    with torch.device("meta"):
        twin = UNet2DConditionModel(**SDXL_DIFFUSERS)
    twin.load_state_dict({k: host_sd[mapping[k]] for k in twin.state_dict()}, strict=True, assign=True)
    full = Setup.__new__(Setup)
    full.model, full.twin, full.widths = model, twin.eval(), None
    full.loader, full.projection = pack_module("ipadapter_core.loader"), pack_module("ipadapter_core.projection")
    full.attention, full.patch = pack_module("ipadapter_core.attention"), pack_module("nodes.patch")
    g = torch.Generator().manual_seed(12)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([421.0, 421.0]), torch.randn(2, 77, 2048, generator=g)
    text_embeds, time_ids = torch.randn(2, 1280, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():  # the host's adm vector is diffusers' [text_embeds, time_ids embedded]
        y = torch.cat([text_embeds, twin.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    adapter, state = full.adapter(stem, 121, tmp_path)
    cond, uncond = embeds_for(adapter.variant, g), embeds_for(adapter.variant, g)
    patched = full.patch.patch_model(model, adapter, full.spec(adapter, cond, uncond, 1.0))

    def host_run(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
        with torch.no_grad():
            return m.model.diffusion_model(x, timesteps=t, context=context, y=y, transformer_options=options)
    ours, plain = host_run(patched), host_run(model)
    twin._load_ip_adapter_weights([state])
    for processor in twin.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [1.0]
    with torch.no_grad():
        theirs = twin(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": text_embeds, "time_ids": time_ids,
            "image_embeds": [_diffusers_embeds(adapter.variant, uncond, cond)]}).sample
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
