"""The Flux image prompt's per-step dispatch cost, counted with the torch profiler (independent of machine speed)."""
from __future__ import annotations

import pytest
import torch

from bench.flux_budget import FluxBench, dispatch

pytestmark = pytest.mark.host
# measured 11.7 where the blocks call no attention patches (35 over 2 + 1 blocks: un-rotation 6, attention and add 4,
# 2 shared), 3.7 where they do (11: per block the query's copy to [B, L, C], an attention and an add, the single-
# stream block's text rows one attention and add more)
OPS_PER_INSTANTX_BLOCK = 12


@pytest.fixture(scope="module")
def bench(host):
    return FluxBench()


def test_no_host_syncs_and_a_fixed_number_of_operators_per_block(bench):
    """Per double-stream block: the image query (modulation, norm, qkv, RMS norm), one attention, one add; a second
    adapter joins the same attention call (equal token counts) or adds one more (4 and 16 tokens)."""
    result = dispatch(bench, {"one": ["v1"], "same tokens": ["v1", "v1"], "other tokens": ["v1", "v2"]})
    one, same, other = (result["cases"][k] for k in ("one", "same tokens", "other tokens"))
    assert result["bare_syncs"] == 0 and all(row["syncs_added"] == 0 for row in (one, same, other))
    assert one["ops_per_block"] <= 16
    assert same["ops_added"] <= one["ops_added"] + 2 * result["blocks"]  # K/V concatenated once, not per step
    assert other["ops_added"] <= one["ops_added"] + 4 * result["blocks"]


def test_a_mask_and_a_sigma_range_add_no_host_syncs(bench):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    for batch in (1, 2):
        (row,) = dispatch(bench, {"v1": ["v1"]}, batch=batch, attn_mask=mask, start_at=0.1, end_at=0.9)["cases"].values()
        assert row["syncs_added"] == 0


def test_instantx_adds_no_host_syncs_and_a_fixed_number_of_operators_per_block(bench):
    """Per block, double- or single-stream: the query (un-rotated where the host's blocks hand over only the rotated
    one), one attention, one add (no projection: the block's own query is reused); a second adapter with as many
    tokens joins the same attention call."""
    result = dispatch(bench, {"one": ["instantx"], "two": ["instantx", "instantx"]})
    one, two = result["cases"]["one"], result["cases"]["two"]
    assert one["blocks"] == result["all_blocks"] == 3
    assert one["syncs_added"] == 0 and two["syncs_added"] == 0
    assert one["ops_per_block"] <= OPS_PER_INSTANTX_BLOCK
    assert two["ops_added"] <= one["ops_added"] + 3 * one["blocks"]  # K/V concatenated once, not per step


def test_reference_controls_add_no_host_syncs_and_no_operators_per_block(bench):
    """Kontext's reference with the controls, over the host's own reference: a fixed strength or mask is one bias
    per layout (3 operators per call: none per block); start/end gates it on the device each call (14)."""
    from bench.reference_budget import ReferenceBench, dispatch as reference_dispatch
    result = reference_dispatch(ReferenceBench(bench))
    assert result["bare_syncs"] == 0
    for name, row in result["cases"].items():
        assert row["syncs_added"] == 0, name
        assert row["ops_added"] <= (16 if "start/end" in name or "all" in name else 4), (name, row)
