"""Reference controls on FLUX.2 in the pinned host: its FLUX.2-dev layout (``tests/support/flux2.py``: the real widths,
1 double- and 1 single-stream block, random weights) through the host's own loader and ``BaseModel.apply_model``,
with the Reference Controls node's hook.

FLUX.2 reads references as tokens like FLUX.1 Kontext, with a 128-channel latent in 1 x 1 patches (one token a latent
pixel) and each reference at RoPE index 10, 20, ... ("index"): the joint sequence is [text | output | reference 1 |
reference 2]. Two references of different sizes and aspects (2 x 3 and 3 x 3 beside the output's 3 x 4); strength 1
with an all-ones mask is the host's call, strength 0 on the last reference is the host's call without it, 0.5 lies
between; and the host's call equals diffusers' ``Flux2Transformer2DModel`` as ``Flux2Pipeline`` lays the references
out (the independent check of that layout). Each model call costs seconds (2.29 B parameters cast from fp16 per
call on a CPU), so the calls are made once and shared.
"""
from __future__ import annotations

import functools

import pytest
import torch

from support import flux2
from support.nodes import hook_options, run_node
from tools.comfy_host import pack_module

pytestmark = pytest.mark.host

EXACT = 1e-5  # the host against itself
ATOL = 1e-4  # the host against diffusers


@pytest.fixture(scope="module")
def model(host):
    return flux2.load_flux2()


class Calls:
    """The module's model calls, each made once: two references, and the settings of the tests."""

    def __init__(self, host, model):
        self.host = host
        self.model = model
        self.call = flux2.Flux2Call.random(1)

    def conditioning(self):
        """A conditioning that holds the call's text and references, as ReferenceLatent leaves it."""
        return [[self.call.context, {"reference_latents": list(self.call.refs)}]]

    def controlled(self, reference: int, **inputs):
        """The node's hook options for ``reference`` (1-based) under ``inputs`` (strength, mask)."""
        (cond,) = run_node(self.host, "ReferenceLatentControls", conditioning=self.conditioning(), reference=reference,
                           **{"strength": 1.0, "start_at": 0.0, "end_at": 1.0, **inputs})
        return hook_options(cond)

    @functools.cached_property
    def both(self) -> torch.Tensor:
        """The host's own call with both references (velocity)."""
        return flux2.apply_model(self.model, self.call)

    @functools.cached_property
    def first_only(self) -> torch.Tensor:
        """The host's own call with the first reference alone."""
        return flux2.apply_model(self.model, self.call.with_refs(self.call.refs[:1]))

    def with_controls(self, reference: int, seen: list | None = None, **inputs) -> torch.Tensor:
        """The host's call under the node's hook; ``seen`` collects (q shape, mask) of every attention of the
        call, through an attention override set before ours (which runs it with our bias in its mask)."""
        options = self.controlled(reference, **inputs)
        if seen is not None:
            def record(func, *args, **kwargs):
                seen.append((tuple(args[0].shape), kwargs.get("mask")))
                return func(*args, **kwargs)
            options = {**options, "optimized_attention_override": record}
        return flux2.apply_model(self.model, self.call, options)


@pytest.fixture(scope="module")
def calls(host, model):
    return Calls(host, model)


def report(label: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs().max().item()
    print(f"{label}: max abs diff {diff:.2e} (output max {theirs.abs().max().item():.2f})")
    return diff


def test_the_host_loads_this_layout_as_flux2_and_lays_out_the_references_after_the_output(host, model, calls):
    import comfy.model_base
    glue = pack_module("nodes.patch.reference_tokens")
    base = model.model
    assert isinstance(base, comfy.model_base.Flux2)
    assert base.model_config.unet_config["image_model"] == "flux2"
    params = base.diffusion_model.params
    assert len(params.axes_dim) == 4 and params.global_modulation and params.default_ref_method == "index"
    assert (params.hidden_size, params.num_heads, params.in_channels, params.context_in_dim) == (6144, 48, 128, 15360)
    assert (params.depth, params.depth_single_blocks, base.diffusion_model.patch_size) == (1, 1, 1)
    assert base.latent_format.latent_channels == 128
    assert base.get_dtype() == torch.float16 and base.manual_cast_dtype == torch.float32
    # the glue's view of a call: 4 text tokens, the output's 3 x 4 grid, references of 6 and 9 tokens (1 x 1 patches)
    wrapper = glue.ReferenceControlsWrapper({1: glue.ReferenceSetting(0.5, 0.0, 1.0, None)})
    layout = wrapper.layout(base, calls.call.x, calls.call.context, calls.call.refs)
    assert (layout.text, layout.grid, layout.references, layout.length) == (4, (3, 4), (6, 9), 31)


def test_strength_one_with_an_all_ones_mask_is_the_hosts_call(calls):
    seen = []
    ours = calls.with_controls(1, seen, mask=torch.ones(1, 48, 64))
    # through the bias (all zeros in both attentions), not the identity path that adds nothing
    assert len(seen) == 2 and all(torch.equal(mask, torch.zeros(1, 1, 31, 31)) for _, mask in seen)
    assert report("FLUX.2, reference 1 at 1 with an all-ones mask vs the host", ours, calls.both) <= EXACT
    effect = (calls.both - calls.first_only).abs().max().item()
    print(f"FLUX.2, the second reference moves the output by {effect:.2e}")
    assert effect > 100 * ATOL  # the references really act


def test_strength_zero_on_the_last_reference_is_the_hosts_call_without_it(calls):
    ours = calls.with_controls(2, strength=0.0)
    assert report("FLUX.2, reference 2 at 0 vs the host without it", ours, calls.first_only) <= EXACT


def test_strength_between_moves_the_output_between(calls):
    seen = []
    half = calls.with_controls(2, seen, strength=0.5)
    # both attentions of the call (the double- and the single-stream block's) ran over the joint sequence of 31
    # tokens (4 text, 12 output, 6 + 9 references; 48 heads of 128) with log 0.5 on reference 2's columns for
    # every row but its own
    assert [shape for shape, _ in seen] == [(1, 48, 31, 128)] * 2
    for _, mask in seen:
        expected = torch.zeros(1, 1, 31, 31)
        expected[..., :22, 22:] = torch.log(torch.tensor(0.5))
        torch.testing.assert_close(mask, expected)
    full, none = calls.both, calls.first_only
    ratio = float((half - none).abs().mean() / (full - none).abs().mean())
    print(f"FLUX.2, reference 2 at 0.5: moves the output {ratio:.2f} of the way from without it to 1")
    assert 0.2 < ratio < 0.9
    assert (half - full).abs().max() > 10 * ATOL and (half - none).abs().max() > 10 * ATOL


def test_a_reference_that_does_not_exist_is_named(calls):
    with pytest.raises(ValueError, match="has 2 reference latent\\(s\\).*reference 3 does not exist"):
        calls.controlled(3, strength=0.5)
    # a conditioning controlled on its second reference, in a model call that has only the first
    options = calls.controlled(2, strength=0.5)
    with pytest.raises(ValueError, match="this model call has 1 reference latent\\(s\\), so reference 2 does not exist"):
        flux2.apply_model(calls.model, calls.call.with_refs(calls.call.refs[:1]), options)


def test_the_hosts_flux2_equals_diffusers_flux2_pipeline_layout(calls):
    """Both references at their Flux2Pipeline places (ids (10, r, c, 0) and (20, r, c, 0), after the output's
    (0, r, c, 0); text (0, 0, 0, l)): diffusers' transformer with the host model's tensors."""
    twin = flux2.twin(calls.model)
    try:
        theirs = flux2.run_twin(twin, calls.call)
    finally:
        del twin
    assert report("FLUX.2, host vs diffusers, two references", calls.both, theirs) <= ATOL
