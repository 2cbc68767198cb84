"""Reference controls (strength, start/end, mask per reference) on the host's token-reference edit models.

The identities, through the node and the host's own sampler and model calls: strength 1 over the whole range with
no mask (or an all-ones mask) is the host's own ReferenceLatent result; strength 0, a step outside the range, or an
all-zero mask is the result without that reference. The other strengths and masks against diffusers' transformer
with the equivalent additive attention mask are in test_reference_edit_parity.py."""
from __future__ import annotations

import pytest
import torch

from support.flux import LATENT_HW, conditioning, inputs
from support.nodes import hook_options, run_node
from tools import factory

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def flux(host, need_models):
    need_models(f"diffusion_models/{factory.FLUX_FILE}")
    (model,) = host.UNETLoader().load_unet(factory.FLUX_FILE, "default")
    return model


def reference_latent(seed: int, hw=(8, 8)) -> torch.Tensor:
    return torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(seed))


def with_references(host, cond, *latents):
    for latent in latents:
        (cond,) = run_node(host, "ReferenceLatent", conditioning=cond, latent={"samples": latent})
    return cond


def controlled(host, cond, reference=1, strength=1.0, start_at=0.0, end_at=1.0, mask=None):
    extra = {} if mask is None else {"mask": mask}
    (out,) = run_node(host, "ReferenceLatentControls", conditioning=cond, reference=reference, strength=strength,
                      start_at=start_at, end_at=end_at, **extra)
    return out


def sample(host, model, positive, steps=2):
    """The host's KSampler, Flux's single pass (cfg 1: the negative is not run)."""
    latent = {"samples": torch.zeros(1, 16, *LATENT_HW)}
    (out,) = host.KSampler().sample(model, 7, steps, 1.0, "euler", "simple", positive, conditioning(2), latent)
    return out["samples"]


def model_call(model, refs, sigma, options=None, seed=0):
    """One call of the host's Flux BaseModel.apply_model, as the sampler makes it (y, guidance, ref_latents)."""
    x, _, context, y, guidance, _ = inputs(1, seed)
    kwargs = {"ref_latents": list(refs)} if refs else {}
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=context, y=y, guidance=guidance,
                                       transformer_options=dict(options or {}), **kwargs)


def test_strength_one_and_an_all_ones_mask_give_the_hosts_reference_result(host, flux):
    refs = (reference_latent(1), reference_latent(2, (6, 10)))
    cond = with_references(host, conditioning(1), *refs)
    hosts = sample(host, flux, cond)
    assert not torch.equal(hosts, sample(host, flux, conditioning(1)))  # the references act
    assert torch.equal(sample(host, flux, controlled(host, cond, 2)), hosts)  # identity: no bias at all
    ones = controlled(host, cond, 1, mask=torch.ones(1, 64, 96))  # through the bias: all zeros
    torch.testing.assert_close(sample(host, flux, ones), hosts, rtol=1e-5, atol=1e-5)


def test_strength_zero_or_an_all_zero_mask_is_the_result_without_that_reference(host, flux):
    first, second = reference_latent(1), reference_latent(2, (6, 10))
    without_second = sample(host, flux, with_references(host, conditioning(1), first))
    both = with_references(host, conditioning(1), first, second)
    for off in (controlled(host, both, 2, strength=0.0), controlled(host, both, 2, mask=torch.zeros(1, 32, 48))):
        torch.testing.assert_close(sample(host, flux, off), without_second, rtol=1e-5, atol=1e-5)
    alone = with_references(host, conditioning(1), first)
    torch.testing.assert_close(sample(host, flux, controlled(host, alone, 1, strength=0.0)),
                               sample(host, flux, conditioning(1)), rtol=1e-5, atol=1e-5)


def test_outside_its_range_a_reference_is_not_read_and_inside_it_is_read_in_full(host, flux):
    ref = reference_latent(3)
    cond = with_references(host, conditioning(1), ref)
    options = hook_options(controlled(host, cond, 1, start_at=0.5, end_at=1.0))
    sampling = flux.get_model_object("model_sampling")
    early, late = float(sampling.percent_to_sigma(0.2)), float(sampling.percent_to_sigma(0.8))
    torch.testing.assert_close(model_call(flux, [ref], early, options), model_call(flux, [], early),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model_call(flux, [ref], late, options), model_call(flux, [ref], late),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model_call(flux, [ref], early), model_call(flux, [], early), atol=1e-4)


def test_strength_between_is_between_and_a_mask_limits_where_it_acts(host, flux):
    ref = reference_latent(4)
    cond = with_references(host, conditioning(1), ref)
    full, none = model_call(flux, [ref], 0.6), model_call(flux, [], 0.6)
    half = model_call(flux, [ref], 0.6, hook_options(controlled(host, cond, 1, strength=0.5)))
    assert 0.2 < float((half - none).abs().mean() / (full - none).abs().mean()) < 0.9
    left = torch.zeros(1, 64, 96)
    left[..., :48] = 1.0
    masked = model_call(flux, [ref], 0.6, hook_options(controlled(host, cond, 1, mask=left)))
    # one block pair mixes the halves a little; the right half stays far closer to the call without the reference
    right_change = (masked - none)[..., 6:].abs().mean() / (full - none)[..., 6:].abs().mean()
    left_change = (masked - none)[..., :6].abs().mean() / (full - none)[..., :6].abs().mean()
    assert float(right_change) < 0.5 < float(left_change)


def test_controls_name_the_reference_that_does_not_exist_and_bad_values(host):
    cond = with_references(host, conditioning(1), reference_latent(1))
    with pytest.raises(ValueError, match="reference 2 does not exist"):
        controlled(host, cond, 2)
    with pytest.raises(ValueError, match="start_at"):
        controlled(host, cond, 1, start_at=0.8, end_at=0.2)
    with pytest.raises(ValueError, match="mask: expected one MASK"):
        controlled(host, cond, 1, mask=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="mask: the MASK holds 64 NaN or infinite values"):
        controlled(host, cond, 1, mask=torch.full((1, 8, 8), float("nan")))


def test_a_second_control_of_the_same_conditioning_joins_the_first(host):
    cond = with_references(host, conditioning(1), reference_latent(1), reference_latent(2))
    twice = controlled(host, controlled(host, cond, 1, strength=0.5), 2, strength=0.0)
    from comfy.patcher_extension import WrappersMP
    wrappers = hook_options(twice)["wrappers"][WrappersMP.APPLY_MODEL]
    (wrapper,) = wrappers["image_prompt_reference_controls"]
    assert {i: s.strength for i, s in wrapper.settings.items()} == {0: 0.5, 1: 0.0}


def guided_eps(host, model, guider_of, seed=5):
    """A guider's ε at two fixed latents of the host's schedule (support.instruct_edit.replay)."""
    from support.instruct_edit import replay
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(1, 16, *LATENT_HW, generator=g) for _ in range(2)]
    return torch.stack(replay(guider_of(model), latents, sigmas))


def host_cfg(host, positive, negative, cfg):
    import comfy.samplers

    def make(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return guider
    return make


def reference_guider(host, positive, negative, text_scale, image_scale):
    return lambda model: run_node(host, "ReferenceEditGuider", model=model, positive=positive, negative=negative,
                                  text_scale=text_scale, image_scale=image_scale)[0]


def test_the_reference_guider_is_two_scale_guidance_and_plain_cfg_with_equal_scales(host, flux):
    from support.instruct_edit import record_batches
    ref = reference_latent(6)
    positive, negative = with_references(host, conditioning(1), ref), conditioning(2)
    cfg = guided_eps(host, flux, host_cfg(host, positive, negative, 3.0))
    counted, calls = record_batches(flux)
    torch.testing.assert_close(guided_eps(host, counted, reference_guider(host, positive, negative, 3.0, 3.0)), cfg,
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * 2  # two latents, the host's two branches (batched or not) and no third
    # unequal scales: ε(∅) + s_T·[ε(T) − ε(∅)] + s_I·[ε(T,I) − ε(T)], each ε the host's own (CFG 1 on one cond)
    without = conditioning(1)
    single = {name: guided_eps(host, flux, host_cfg(host, cond, negative, 1.0))
              for name, cond in (("neg", negative), ("text", without), ("full", positive))}
    expected = single["neg"] + 2.0 * (single["text"] - single["neg"]) + 4.0 * (single["full"] - single["text"])
    torch.testing.assert_close(guided_eps(host, flux, reference_guider(host, positive, negative, 2.0, 4.0)), expected,
                               rtol=1e-4, atol=1e-4)
    # text scale 1 runs no negative: ε(T) + s_I·[ε(T,I) − ε(T)]
    counted, calls = record_batches(flux)
    one = guided_eps(host, counted, reference_guider(host, positive, negative, 1.0, 2.5))
    torch.testing.assert_close(one, single["text"] + 2.5 * (single["full"] - single["text"]), rtol=1e-4, atol=1e-4)
    assert calls and all(0 not in cond_or_uncond for cond_or_uncond, _, _ in calls)  # conds [negative, text, full]


def test_the_reference_guider_refuses_a_positive_without_references(host, flux):
    with pytest.raises(ValueError, match="positive: it holds no reference latents"):
        run_node(host, "ReferenceEditGuider", model=flux, positive=conditioning(1), negative=conditioning(2),
                 text_scale=1.0, image_scale=2.0)
    positive = with_references(host, conditioning(1), reference_latent(1))
    with pytest.raises(ValueError, match="image_scale: expected a finite number from 0.0 to 100.0; got nan"):
        run_node(host, "ReferenceEditGuider", model=flux, positive=positive, negative=conditioning(2),
                 text_scale=1.0, image_scale=float("nan"))
    with pytest.raises(ValueError, match="strength: expected a finite number from 0.0 to 4.0; got nan"):
        controlled(host, positive, 1, strength=float("nan"))
