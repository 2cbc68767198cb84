"""The four patch mechanisms beside other packs and under concurrent calls, on the host's own sampling:

- coexistence: a stand-in for another pack's patch (one that adds a known change and keeps what it finds) and ours,
  applied in either order, give the same result, which differs from each alone: both act, in both orders;
- a stand-in that replaces our hook without calling it makes the sampling warn once, naming the layers;
- concurrency: model calls of one patched model running in two threads at once (as the host's multi-GPU sampling
  runs cond and uncond) equal the same calls one after another.
"""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from support.nodes import run_node
from tools import factory
from tools.comfy_host import pack_module
from tools.factory.dit_models import instantx_sd35_adapter, sd3_transformer

pytestmark = pytest.mark.host

SD15 = ("checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter-plus_sd15.bin",
        "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
FLUX = (f"diffusion_models/{factory.FLUX_FILE}", "clip_vision/clip_vision_l.pt", "ipadapter/flux-ip-adapter.bin",
        "clip_vision/sigclip_vision_patch14_384.pt", f"ipadapter/{factory.INSTANTX_FLUX_FILE}")
FAMILIES = ("unet", "flux_xlabs", "flux_instantx", "sd35")


def dit_conditioning(seed: int, text_width: int, pooled_width: int, **extra):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, text_width, generator=g), {"pooled_output": torch.randn(1, pooled_width, generator=g),
                                                          **extra}]]


class Family:
    """A base model of one family, our adapter on it (with a mask and a sigma range), its conditioning, and the
    keys and kind of the host hooks another pack would use on it."""

    def __init__(self, host, name: str, tmp_path_factory):
        self.host, self.name = host, name
        mask = torch.zeros(1, 64, 96)
        mask[:, :, :48] = 1.0  # the left half
        if name == "unet":
            self.model, clip, _ = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")
            (self.clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
            self.adapter = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter-plus_sd15.bin")[0]
            self.positive = host.CLIPTextEncode().encode(clip, "a house")[0]
            self.negative = host.CLIPTextEncode().encode(clip, "blurry")[0]
            self.channels = 4
        elif name.startswith("flux"):
            (self.model,) = host.UNETLoader().load_unet(factory.FLUX_FILE, "default")
            encoder, file = (("clip_vision_l.pt", "flux-ip-adapter.bin") if name == "flux_xlabs" else
                             ("sigclip_vision_patch14_384.pt", factory.INSTANTX_FLUX_FILE))
            (self.clip_vision,) = host.CLIPVisionLoader().load_clip(encoder)
            self.adapter = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=file)[0]
            self.positive, self.negative = (dit_conditioning(s, 4096, 768, guidance=3.5) for s in (1, 2))
            self.channels = 16
        else:
            import comfy.sd
            self.model = comfy.sd.load_diffusion_model_state_dict(sd3_transformer(2, 7))
            path = tmp_path_factory.mktemp("sd35") / "ip-adapter_sd35_reduced.bin"
            factory.write_state_dict(instantx_sd35_adapter(6, blocks=2, hidden=128), path)
            self.adapter = pack_module("nodes.ipadapter_encode").load(str(path))
            self.positive, self.negative = (dit_conditioning(s, 4096, 2048) for s in (1, 2))
            self.channels = 16
        self.patched = self.apply(1, end_at=0.8, attn_mask=mask)

    def apply(self, images: int, **options):
        """The base model through our Advanced apply node (Apply Embeds for SD3.5's time-conditioned resampler)
        with ``images`` references (random SigLIP hidden states for SD3.5)."""
        g = torch.Generator().manual_seed(3)
        options = dict(model=self.model, ipadapter=self.adapter, weight=1.0, weight_type="linear",
                       embeds_scaling="V only", **options)
        if self.name == "sd35":
            embeds = torch.randn(images, 729, 1152, generator=g)
            return run_node(self.host, "ImagePromptApplyEmbeds", pos_embeds=embeds, **options)[0]
        image = torch.rand(images, 224, 224, 3, generator=g)
        return run_node(self.host, "ImagePromptApplyAdvanced", image=image, clip_vision=self.clip_vision,
                        combine_embeds="concat", composition_weight=1.0, layer_weights="",
                        **{"start_at": 0.0, "end_at": 1.0, "unfold_batch": False, **options})[0]

    def ours(self, model):
        """``model`` with our patch of this family added (the spec of ``self.patched``), by the table's mechanism."""
        return pack_module("nodes.patch").patch_model(model, self.adapter.file, self.specs(self.patched)[-1])

    def specs(self, model) -> tuple:
        options = model.model_options["transformer_options"]
        if self.name == "flux_instantx":
            terms = pack_module("nodes.patch.flux_instantx")
            return terms.applied(options, terms.InstantXTerms).adapters
        hooks = options["patches_replace"]["attn2" if self.name == "unet" else "dit"]
        patch = next(iter(hooks.values()))
        return (patch.prompt if self.name == "sd35" else patch).adapters

    def sample(self, model, steps: int = 2) -> torch.Tensor:
        latent = {"samples": torch.zeros(1, self.channels, 8, 12)}
        return self.host.KSampler().sample(model, 7, steps, 3.0, "euler", "simple", self.positive, self.negative,
                                           latent)[0]["samples"]

    def call(self, model, seed: int, cond_or_uncond: list[int], sigma: float, hw: tuple[int, int]) -> torch.Tensor:
        """One model call of one latent per chunk, from seeded noise."""
        x = torch.randn(len(cond_or_uncond), self.channels, *hw, generator=torch.Generator().manual_seed(seed))
        return self.call_on(model, x, cond_or_uncond, sigma)

    def second_model(self):
        """Another model of this family's layout, with other weights."""
        if self.name == "sd35":
            import comfy.sd
            return comfy.sd.load_diffusion_model_state_dict(sd3_transformer(2, 8))
        model = (self.host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0] if self.name == "unet" else
                 self.host.UNETLoader().load_unet(factory.FLUX_FILE, "default")[0])
        g = torch.Generator().manual_seed(9)
        for weight in model.model.diffusion_model.parameters():
            weight.data += 0.05 * torch.randn(weight.shape, generator=g).to(weight)
        return model

    def call_on(self, model, x: torch.Tensor, cond_or_uncond: list[int], sigma: float, running=None,
                **options) -> torch.Tensor:
        """One model call on ``x`` (chunks of equal rows) as the host's sampler makes it: ``model``'s wrappers and
        ``options`` (a context window) in the transformer options, run by ``running`` (another model, as a two-model
        guider or a multi-GPU clone runs one with these options) or ``model``."""
        rows = x.shape[0] // len(cond_or_uncond)
        conds = [(self.positive, self.negative)[c][0] for c in cond_or_uncond for _ in range(rows)]
        context = torch.cat([c[0] for c in conds])
        extra = {}
        if self.name != "unet":
            extra["y"] = torch.cat([c[1]["pooled_output"] for c in conds])
        if self.name.startswith("flux"):
            extra["guidance"] = torch.full((len(conds),), 3.5)
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                       sigmas=torch.full((1,), sigma), wrappers=model.wrappers, **options)
        with torch.no_grad():
            return (running or model).model.apply_model(x, torch.full((len(conds),), sigma), c_crossattn=context,
                                                        transformer_options=options, **extra)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, host, need_models, tmp_path_factory):
    need_models(*SD15, *FLUX)
    return Family(host, request.param, tmp_path_factory)


# --- another pack's patches, as stand-ins -----------------------------------------------------------------------

class OtherAttn2:
    """Another pack's attn2 replace patch: the attention it finds (a patch there before it, else the host's) plus
    a known term, 0.05 q; ``keeps=False``: it ignores what it finds."""

    def __init__(self, before, keeps: bool = True):
        self.before = before if keeps else None

    def __call__(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention
        out = self.before(q, k, v, extra) if self.before is not None else \
            optimized_attention(q, k, v, extra["n_heads"], transformer_options=extra)
        return out + 0.05 * q


class OtherBlock:
    """Another pack's DiT block patch: the block it finds (a patch there before it, else the plain block), plus a
    known term on its image stream, a fixed pattern per token and channel (a constant would vanish in the next
    LayerNorm); ``keeps=False``: it ignores a patch there before it."""

    def __init__(self, before, keeps: bool = True):
        self.before = before if keeps else None

    def __call__(self, args, extra):
        out = self.before(args, extra) if self.before is not None else extra["original_block"](args)
        img = out["img"]
        pattern = torch.randn(img.shape[1:], generator=torch.Generator().manual_seed(5)).to(img)
        return {**out, "img": img + 0.05 * pattern}


def with_other(family: Family, model, keeps: bool = True):
    """A clone of ``model`` with the stand-in other pack's patch on every layer our mechanism patches."""
    other = model.clone()
    options = other.model_options["transformer_options"]
    if family.name == "unet":
        found = options.get("patches_replace", {}).get("attn2", {})
        for layer in pack_module("nodes.patch.layers").cross_attention_layers(model)[0]:
            other.set_model_attn2_replace(OtherAttn2(found.get(layer.key), keeps), *layer.key)
        return other
    found = options.get("patches_replace", {}).get("dit", {})
    blocks = model.get_model_object("diffusion_model")
    count = len(blocks.double_blocks if family.name.startswith("flux") else blocks.joint_blocks)
    for i in range(count):
        other.set_model_patch_replace(OtherBlock(found.get(("double_block", i)), keeps), "dit", "double_block", i)
    return other


def test_another_packs_patch_and_ours_both_act_in_either_order(family):
    plain = family.sample(family.model)
    ours = family.sample(family.patched)
    other = family.sample(with_other(family, family.model))
    ours_then_other = family.sample(with_other(family, family.patched))
    other_then_ours = family.sample(family.ours(with_other(family, family.model)))
    torch.testing.assert_close(ours_then_other, other_then_ours, rtol=1e-5, atol=1e-5)  # sums in another order
    for name, alone in (("the bare model", plain), ("ours alone", ours), ("the other alone", other)):
        assert (ours_then_other - alone).abs().max() > 1e-3, f"both patches sample as {name}"
    assert (ours - plain).abs().max() > 1e-3 and (other - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["unet", "flux_xlabs", "sd35"], indirect=True)  # InstantX: also single blocks
def test_a_patch_that_drops_ours_makes_the_sampling_warn_once(family, caplog):
    dropped = with_other(family, family.patched, keeps=False)
    with caplog.at_level(logging.WARNING):
        family.sample(dropped)
        family.sample(dropped)
    warnings = [r.getMessage() for r in caplog.records if "image prompt did not run" in r.getMessage()]
    assert len(warnings) == 1, warnings
    kind = {"unet": "cross-attention layers", "flux_xlabs": "double-stream blocks", "sd35": "joint blocks"}[family.name]
    assert kind in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        family.sample(family.patched)
    assert not [r for r in caplog.records if "image prompt did not run" in r.getMessage()]


def test_concurrent_calls_of_one_patched_model_equal_sequential_ones(family):
    """Calls with different batches, steps and latent sizes (per-call state: latent size, the step's gates and
    tokens, a block's pending attention, scratch buffers), four rounds of two threads started together."""
    calls = [(11, [0], 0.9, (8, 12)), (12, [1, 0], 0.3, (16, 8))]
    sequential = [family.call(family.patched, *c) for c in calls]
    for _ in range(4):
        results, start = [None, None], threading.Barrier(2)

        def worker(i):
            start.wait()
            results[i] = family.call(family.patched, *calls[i])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, expected in zip(results, sequential):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_unfolded_batch_on_a_window_of_the_frames_equals_one_pass(family):
    """Four references unfolded over four frames, under CFG: the model run on a window of the frames (the host's
    context window in the options; its anchor frame first where the host slices one, as 0.28's causal_window_fix
    does) gives each of its rows what one pass over the whole batch gives that frame."""
    from support.context_windows import context_window
    patched = family.apply(4, unfold_batch=True)
    x = torch.randn(8, family.channels, 8, 12, generator=torch.Generator().manual_seed(4))  # uncond 0-3, cond 0-3
    whole = family.call_on(patched, x, [1, 0], 0.5)
    window = context_window([2, 3], total=4)
    window.causal_anchor_index = 1  # the frame a host with causal_window_fix puts first; older hosts ignore it
    frames = window.get_tensor(torch.arange(4)).tolist()
    rows = torch.tensor([chunk * 4 + f for chunk in range(2) for f in frames])
    in_window = family.call_on(patched, x[rows], [1, 0], 0.5, context_window=window)
    torch.testing.assert_close(in_window, whole[rows], rtol=0, atol=1e-5)


def test_the_patch_uses_the_blocks_of_the_model_that_runs(family):
    """A patched model's options run by another model of the same layout (as the host's two-model guider runs the
    negative model, or multi-GPU sampling a clone on another device) give what patching that model gives."""
    other = family.second_model()
    x = torch.randn(2, family.channels, 8, 12, generator=torch.Generator().manual_seed(6))
    ran = family.call_on(family.patched, x, [1, 0], 0.5, running=other)
    torch.testing.assert_close(ran, family.call_on(family.ours(other), x, [1, 0], 0.5), rtol=0, atol=1e-5)
    assert (ran - family.call_on(family.patched, x, [1, 0], 0.5)).abs().max() > 1e-3  # the models differ


@pytest.mark.parametrize("family", ["sd35"], indirect=True)
def test_the_hosts_memory_manager_loads_the_adapter_weights_with_the_model(family):
    """SD3.5's adapter weights (resampler, per-block projections) are a model patcher the patched model names, so
    the host loads and offloads them with it; a sampling after the host unloaded everything gives the same result."""
    import comfy.model_management
    weights = pack_module("ipadapter_core.joint_attention").JointAdapterWeights
    named = family.patched.model_patches_models()
    assert len(set(named)) == 1 and isinstance(named[0].model, weights)
    first = family.sample(family.patched)
    assert named[0] in [loaded.model for loaded in comfy.model_management.current_loaded_models]
    comfy.model_management.unload_all_models()
    torch.testing.assert_close(family.sample(family.patched), first, rtol=0, atol=0)


def test_the_variant_table_names_one_mechanism_of_the_registry_per_row(host):
    variants = pack_module("ipadapter_core.variants")
    mechanisms = pack_module("nodes.patch").MECHANISMS
    assert tuple(mechanisms) == variants.PATCH_MECHANISMS
    assert {variant.patch for variant in variants.VARIANTS} == set(mechanisms)  # every mechanism is some row's
