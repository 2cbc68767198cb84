"""The patch's per-step dispatch cost, counted with the torch profiler (independent of machine speed)."""
from __future__ import annotations

import pytest
import torch

from bench.dispatch_budget import measure
from support.attention_forms import forced_plan
from tools import comfy_host, factory

pytestmark = pytest.mark.host


def test_no_host_syncs_and_a_fixed_number_of_operators_per_layer(host):
    result = measure("tiny", stacks=(1, 3))
    one, three = result["stacks"]
    assert result["layers"] == 4  # every cross-attention layer of the tiny UNet is patched
    assert one["syncs_added"] == three["syncs_added"] == 0
    # one image attention and one in-place add per layer, whatever the host's own attention
    assert one["ops_per_layer_per_adapter"] <= 3
    # stacked adapters are extra heads of one attention call: at most twice one adapter's operators
    assert three["ops_added"] <= 2 * one["ops_added"]


def test_sigma_range_and_mask_add_no_host_syncs(host):
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0
    gated = measure("tiny", stacks=(1,), start_at=0.2, end_at=0.8, attn_mask=mask)["stacks"][0]
    assert gated["syncs_added"] == 0


@pytest.mark.heavy  # for its own process: the host's attention is chosen once per process
def test_with_sdpa_one_adapter_adds_at_most_three_operators_per_layer(tmp_path):
    """The issue's budget, under the attention the host uses on NVIDIA GPUs (SDPA), which this process
    (its own) configures before anything else starts the host (so no host fixture here)."""
    comfy_host.import_host(base_dir=tmp_path, models_dir=factory.models_dir(), load_nodes=False,
                           pytorch_attention=True)
    import comfy.ldm.modules.attention as host_attention
    assert host_attention.optimized_attention is host_attention.attention_pytorch
    one = measure("tiny", stacks=(1,))["stacks"][0]
    assert one["syncs_added"] == 0
    assert one["ops_per_layer_per_adapter"] <= 3


def test_whole_sampler_steps_add_no_host_syncs_and_the_gpu_bench_runs(host, need_models, tmp_path, monkeypatch):
    """bench.gpu_step on the CPU with the tiny UNet: every variant through the host's sampler; ours adds
    operators but no host syncs per step, whatever the adapter, on each of the 4 layers; bench.report
    makes a table row of each variant."""
    from bench import gpu_step, report
    need_models("checkpoints/tiny_sd15.ckpt", *gpu_step.MODELS["tiny"][2].values())
    out = tmp_path / "gpu_step_sd15_512.json"  # the name a device run gives it (bench.device.RUNS)
    result = gpu_step.main(["--model", "tiny", "--size", "64", "--steps", "3", "--rounds", "1", "--cpu", "--out", str(out)])
    rows = result["variants"]
    assert set(rows) == {"bare", "ours: base", "ours: plus", "ours: full-face", "ours: plus x4"}
    for name, row in rows.items():
        assert row["wall_ms"]["n"] == 2 and row["wall_ms"]["median"] > 0  # 3 steps timed, the first dropped
        assert row["patched_layers"] == (0 if name == "bare" else 4)
        assert row["adapters"] == (0 if name == "bare" else 4 if name.endswith("x4") else 1)
        if name != "bare":
            assert row["syncs"] == rows["bare"]["syncs"]
            assert row["operators"] > rows["bare"]["operators"]
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = [line for line in report.gpu_section() if line.startswith("| ours: ")]
    assert [line.split(" | ")[0] for line in table] == [f"| {name}" for name in rows if name != "bare"]
    assert all("(4 layers) | +0 |" in line for line in table)  # patched layers, host syncs added


def test_the_edit_guider_bench_counts_each_guider_on_the_host_device(host, need_models):
    """bench.edit_guider --device (here the CPU, the host's device without an accelerator): every guider
    steps, profiled; ours with constant scales reads back from the device no more often than the host's
    DualCFGGuider, and with a guidance interval once more per step (σ, to decide on the null branch)."""
    from bench import edit_guider
    need_models("checkpoints/tiny_sd15_ip2p.ckpt")
    result = edit_guider.main(["--unet", "tiny", "--size", "64", "--rounds", "1", "--device"])
    rows = result["variants"]
    assert set(rows) == {"host DualCFGGuider", "ours", "ours, interval 0-0.3, step outside", "host CFGGuider (2 conds)"}
    for row in rows.values():
        assert row["wall_seconds"]["median"] > 0 and row["operators"] > 0
    dual = rows["host DualCFGGuider"]["syncs"]
    assert rows["ours"]["syncs"] <= dual
    assert rows["ours, interval 0-0.3, step outside"]["syncs"] <= dual + 1


@pytest.mark.parametrize("form", ["extra heads", "head products"])
def test_a_window_of_the_frames_adds_only_its_row_selections(monkeypatch, form):
    """An unfolded adapter with masks per frame, called on a window of the frames (frames 2..5 of 8): beside
    the call on frames 0..3 it adds three selections (its K and V rows, its mask rows) and makes no index
    tensor from host data per call (on a GPU, each such copy waits for the GPU)."""
    from bench.dispatch_budget import aten_ops
    from ipadapter_core import adapter_spec, attention, attention_forms
    plan = forced_plan(attention_forms, form)
    monkeypatch.setattr(attention, "attention_plan", lambda *_: plan)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 8, 8, generator=g)
    spec = adapter_spec.AdapterSpec(torch.randn(3, 16, 32, generator=g), torch.randn(3, 16, 32, generator=g),
                                    (torch.randn(64, 32, generator=g),), (torch.randn(64, 32, generator=g),), (1.0,),
                                    mask=masks)
    q, text = torch.randn(8, 64, 64, generator=g), torch.randn(8, 7, 64, generator=g)
    options = {"n_heads": 4, "block": ("input", 1), "block_index": 0, "original_shape": [8, 4, 8, 8]}

    def call(frames):
        patch = attention.DecoupledCrossAttention(lambda q, k, v, heads, **_: torch.zeros_like(q),
                                                  {("input", 1, 0): 0}, (spec,), lambda _: (True, False),
                                                  lambda _, rows: frames)
        return lambda: patch(q, text, text, options)
    plain, window = aten_ops(call(None)), aten_ops(call((2, 3, 4, 5)))
    assert window - plain == {"aten::index_select": 3}
    assert "aten::lift_fresh" not in window
