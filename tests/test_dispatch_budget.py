"""The patch's per-step dispatch cost, counted with the torch profiler (independent of machine speed)."""
from __future__ import annotations

import pytest
import torch

from bench.dispatch_budget import measure

pytestmark = pytest.mark.host


def test_no_host_syncs_and_a_fixed_number_of_operators_per_layer(host):
    result = measure("tiny", stacks=(1, 3))
    one, three = result["stacks"]
    assert one["syncs_added"] == three["syncs_added"] == 0
    assert one["ops_per_layer_per_adapter"] == three["ops_per_layer_per_adapter"]  # linear in adapters
    # the image attention (the host's CPU default, sub-quadratic: 9 operators here) and one in-place add
    assert one["ops_per_layer_per_adapter"] <= 10


def test_sigma_range_and_mask_add_no_host_syncs(host):
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0
    gated = measure("tiny", stacks=(1,), start_at=0.2, end_at=0.8, attn_mask=mask)["stacks"][0]
    assert gated["syncs_added"] == 0
