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
