"""Edits with reference latents: the host's FLUX.1 Kontext and Qwen-Image-Edit transformers equal diffusers'.

The independent side of per-reference-token parity (``tests/support/reference_models.py``): one transformer call with
the references laid out as ``FluxKontextPipeline``, ``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` lay
them out, against the host's ``diffusion_model(..., ref_latents=[...])`` with its default reference method; random
weights at the real widths (Flux: the factory's FLUX.1-dev layout, 2 + 1 blocks; Qwen-Image: 2 blocks), fp32. And the
additive attention mask of the diffusers side reaches diffusers' own attention: masking every reference column for
every row that is not a reference's gives diffusers' call without the references.
"""
from __future__ import annotations

import pytest
import torch

from support import reference_models
from support.nodes import hook_options
from support.reference_models import EditCall, token_counts
from tools import factory

pytestmark = pytest.mark.host

ATOL = 1e-4


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, label: str, effect: torch.Tensor | None = None) -> None:
    """Max abs difference within ATOL; the figures (also relative to the output's largest value and, given the
    references' effect on the output, to that) are printed for the record."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    note = f"{label}: max abs diff {diff:.2e}, relative {diff / scale:.2e} (output max {scale:.2f})"
    if effect is not None:
        note += f", references move the output by {effect.abs().max().item():.2e}"
    print(note)
    assert diff <= ATOL, note


def references_hidden(call: EditCall) -> torch.Tensor:
    """An additive mask [1, 1, L, L] that hides every reference token from the text and output image tokens (the
    references' own rows see everything)."""
    counts = token_counts(call)
    spans = counts.spans()
    mask = torch.zeros(1, 1, counts.total, counts.total)
    others = slice(0, spans[1].stop)
    for ref in spans[2:]:
        mask[:, :, others, ref] = float("-inf")
    return mask


# Class scope: each pair (host model and twin: 7 GB for Flux, 6 GB for Qwen-Image) is freed before the next is built.
@pytest.fixture(scope="class")
def kontext(host, need_models):
    return reference_models.kontext(host, need_models(f"diffusion_models/{factory.FLUX_FILE}"))


@pytest.fixture(scope="class")
def qwen(host):
    return reference_models.qwen_image(host)


class TestKontext:
    @pytest.mark.parametrize("ref_hw", [(8, 12), (10, 14)], ids=["output size", "other size"])
    def test_one_reference_matches_flux_kontext_pipeline_layout(self, kontext, ref_hw):
        """A reference of the output's size (8 x 12 latent, 4 x 6 tokens) and one of another size and aspect with
        an odd token grid (5 x 7)."""
        call = kontext.inputs(1, ref_hws=[ref_hw])
        assert token_counts(call) == reference_models.TokenCounts(5, 24, (ref_hw[0] * ref_hw[1] // 4,))
        ours, theirs = kontext.run_both(call)
        plain = kontext.run_host(call.without_references())
        assert_parity(ours, theirs, f"Kontext, reference {ref_hw}", ours - plain)
        assert (ours - plain).abs().max() > 100 * ATOL  # the reference really moved the output

    def test_the_diffusers_mask_reaches_diffusers_attention(self, kontext):
        call = kontext.inputs(2, ref_hws=[(10, 14)])
        masked = kontext.run_diffusers(call, references_hidden(call))
        plain = kontext.run_diffusers(call.without_references())
        assert_parity(masked, plain, "Kontext, references masked vs none (diffusers)")
        assert (kontext.run_diffusers(call) - plain).abs().max() > 100 * ATOL


class TestQwenImageEdit:
    @pytest.mark.parametrize("ref_hws", [[(8, 12)], [(12, 8), (8, 8)]], ids=["edit, one", "edit plus, two sizes"])
    def test_references_match_qwen_image_edit_pipelines_layout(self, qwen, ref_hws):
        """One reference of the output's size (``QwenImageEditPipeline``); two of other sizes and aspects
        (``QwenImageEditPlusPipeline``: 6 x 4 and 4 x 4 tokens beside the output's 4 x 6)."""
        call = qwen.inputs(3, ref_hws=ref_hws)
        ours, theirs = qwen.run_both(call)
        assert ours.shape == call.x.shape
        plain = qwen.run_host(call.without_references())
        assert_parity(ours, theirs, f"Qwen-Image-Edit, references {ref_hws}", ours - plain)
        assert (ours - plain).abs().max() > 100 * ATOL

    def test_the_diffusers_mask_reaches_diffusers_attention(self, qwen):
        call = qwen.inputs(4, ref_hws=[(12, 8), (8, 8)])
        masked = qwen.run_diffusers(call, references_hidden(call))
        plain = qwen.run_diffusers(call.without_references())
        assert_parity(masked, plain, "Qwen-Image-Edit, references masked vs none (diffusers)")
        assert (qwen.run_diffusers(call) - plain).abs().max() > 100 * ATOL


def controlled_call(host, pair, call: EditCall, controls: dict[int, dict]) -> torch.Tensor:
    """The host's model call through the sampler's entry (``BaseModel.apply_model``) with the Reference Controls
    node's hook on a conditioning that holds ``call``'s references; ``controls``: reference number -> node inputs.
    Returned as the transformer's own output (velocity): apply_model gives x − σ·v on these flow models."""
    cond = [[call.context, {"reference_latents": list(call.refs)}]]
    for reference, inputs in controls.items():
        (cond,) = host.NODE_CLASS_MAPPINGS["ReferenceLatentControls"].execute(
            conditioning=cond, reference=reference, **{"start_at": 0.0, "end_at": 1.0, **inputs}).result
    extra = {"y": call.y, "guidance": call.guidance} if call.y is not None else {}
    options = dict(hook_options(cond), cond_or_uncond=[0] * call.x.shape[0], sigmas=call.t)
    with torch.no_grad():
        denoised = pair.model.model.apply_model(call.x, call.t, c_crossattn=call.context, ref_latents=list(call.refs),
                                                transformer_options=options, **extra)
    sigma = call.t.reshape(-1, *[1] * (call.x.ndim - 1))
    return (call.x - denoised) / sigma


def equivalent_mask(call: EditCall, strengths: dict[int, float], grids: dict[int, torch.Tensor]) -> torch.Tensor:
    """The additive mask [1, 1, L, L] the controls stand for, written out row by row: on reference r's columns,
    log(s) for every row outside r (log(s·g[p]) for the output token p when r has a token-grid mask g, and
    log(s·mean(g)) for the text and the other references' rows)."""
    counts = token_counts(call)
    spans = counts.spans()
    mask = torch.zeros(1, 1, counts.total, counts.total)
    for r, s in strengths.items():
        columns = spans[2 + r]  # spans: text, output image, then each reference
        grid = grids.get(r)
        for row in range(counts.total):
            if columns.start <= row < columns.stop:
                continue
            if grid is not None and spans[1].start <= row < spans[1].stop:
                scale = s * float(grid.flatten()[row - spans[1].start])
            else:
                scale = s * (float(grid.mean()) if grid is not None else 1.0)
            mask[0, 0, row, columns] = torch.log(torch.tensor(scale))
    return mask


def left_half(call: EditCall) -> tuple[torch.Tensor, torch.Tensor]:
    """A pixel mask [1, 8H, 8W] of the output's left half, and the same on its token grid (H/2 x W/2; the edges fall
    between tokens, so the grid is exactly 0 or 1)."""
    h, w = call.x.shape[-2:]
    pixels = torch.zeros(1, 8 * h, 8 * w)
    pixels[..., : 4 * w] = 1.0
    grid = torch.zeros(h // 2, w // 2)
    grid[:, : w // 4] = 1.0
    return pixels, grid


class TestControlsKontext:
    """Strength and mask on Kontext's reference against diffusers' Flux with the equivalent additive mask."""

    @pytest.mark.parametrize("strength, masked", [(0.4, False), (1.0, True), (2.0, True)],
                             ids=["strength 0.4", "mask", "strength 2 and mask"])
    def test_controls_equal_diffusers_attention_with_the_equivalent_mask(self, host, kontext, strength, masked):
        call = kontext.inputs(5, ref_hws=[(8, 12)])
        pixels, grid = left_half(call)
        ours = controlled_call(host, kontext, call, {1: {"strength": strength, **({"mask": pixels} if masked else {})}})
        theirs = kontext.run_diffusers(call, equivalent_mask(call, {0: strength}, {0: grid} if masked else {}))
        assert_parity(ours, theirs, f"Kontext controls, strength {strength}, mask {masked}",
                      ours - kontext.run_host(call))
        assert (ours - kontext.run_host(call)).abs().max() > 100 * ATOL  # the controls really changed the call


class TestControlsQwenImageEdit:
    def test_two_references_of_different_strengths_and_a_mask_equal_diffusers_with_the_equivalent_mask(self, host,
                                                                                                         qwen):
        call = qwen.inputs(6, ref_hws=[(8, 12), (8, 8)])
        pixels, grid = left_half(call)
        ours = controlled_call(host, qwen, call, {1: {"strength": 0.5}, 2: {"strength": 1.5, "mask": pixels}})
        theirs = qwen.run_diffusers(call, equivalent_mask(call, {0: 0.5, 1: 1.5}, {1: grid}))
        assert_parity(ours, theirs, "Qwen-Image-Edit controls: 0.5, and 1.5 with a mask", ours - qwen.run_host(call))
        assert (ours - qwen.run_host(call)).abs().max() > 100 * ATOL

    def test_strength_zero_on_the_first_of_two_hides_it_and_keeps_the_seconds_place(self, host, qwen):
        """No row but its own reads the first reference; the second keeps its RoPE frame (2), so this is the call
        without the first reference's tokens, not the call where the second reference is the first."""
        call = qwen.inputs(7, ref_hws=[(8, 12), (8, 8)])
        ours = controlled_call(host, qwen, call, {1: {"strength": 0.0}})
        assert_parity(ours, qwen.run_diffusers(call, equivalent_mask(call, {0: 0.0}, {})), "Qwen strength 0")
        last_zero = controlled_call(host, qwen, call, {2: {"strength": 0.0}})
        without_last = EditCall(call.x, call.t, call.context, [call.refs[0]])
        assert_parity(last_zero, qwen.run_host(without_last), "Qwen strength 0 on the last reference vs without it")
