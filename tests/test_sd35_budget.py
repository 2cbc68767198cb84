"""The SD3.5 image prompt's per-step dispatch cost, counted with the torch profiler (independent of machine speed)."""
from __future__ import annotations

import pytest
import torch

from bench.flux_budget import dispatch
from bench.sd35_budget import BLOCKS, SD35Bench

pytestmark = pytest.mark.host
OPS_PER_JOINT_BLOCK = 26  # measured 23.5 (batch 1) and 21.5 (CFG): modulated tokens, image K/V, attention, add


@pytest.fixture(scope="module")
def bench(host):
    return SD35Bench(width=128)  # operator counts do not depend on the width


@pytest.mark.parametrize("batch", [1, 2])  # Flux-style single pass and CFG
def test_no_host_syncs_the_resampler_once_per_step_and_a_fixed_number_of_operators_per_block(bench, batch):
    resampler = bench.resampler_ops(batch)
    result = dispatch(bench, {"one": ["sd35"], "two": ["sd35", "sd35"]}, batch=batch)
    one, two = result["cases"]["one"], result["cases"]["two"]
    assert result["bare_syncs"] == 0 and one["syncs_added"] == 0 and two["syncs_added"] == 0
    per_block = (one["ops_added"] - resampler) / BLOCKS
    assert 0 < per_block <= OPS_PER_JOINT_BLOCK
    assert two["ops_added"] <= 2 * one["ops_added"] + 2 * BLOCKS  # its own resampler and block terms, and the sum


def test_a_mask_and_a_sigma_range_add_no_host_syncs(bench):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    for batch in (1, 2):
        (row,) = dispatch(bench, {"sd35": ["sd35"]}, batch=batch, attn_mask=mask, start_at=0.1, end_at=0.9)["cases"].values()
        assert row["syncs_added"] == 0


def test_the_resampler_runs_on_the_distinct_reference_rows_only(bench):
    """A batch of 4 latents with CFG needs 2 rows of the resampler (the image's cond and uncond), not 8: its
    operators do not grow with the batch."""
    rows = dispatch(bench, {"sd35": ["sd35"]}, batch=2)["cases"]["sd35"]["ops_added"]
    assert dispatch(bench, {"sd35": ["sd35"]}, batch=4)["cases"]["sd35"]["ops_added"] <= rows + 2
