"""Dispatch budget of the IP-Adapter patch: operators and host syncs it adds to one UNet step.

On a GPU the host's sampler step is bound by kernel launches (shared/reference/gpu.md), so an adapter's
cost there is what it adds in operators (each at least one kernel launch) and host syncs. Both are
counted with the torch profiler on the CPU, identically on any machine, with our image attention in the
forms it takes on a GPU: one batch-2 UNet call (uncond + cond), bare against patched with 1, 2 and 4
stacked adapters, after a warm-up call (image K/V are computed once per run, not per step).

    .venv/bin/python -m bench.dispatch_budget [--full] [--pytorch-attention] [--cubiq DIR] [--out FILE]

--pytorch-attention uses SDPA, the host's attention on NVIDIA GPUs (the CPU default is sub-quadratic).
--cubiq DIR also counts ComfyUI_IPAdapter_plus unpacked in DIR (outside this repository), loaded by the host
as a custom node and applied with its IPAdapterEmbeds node to the same file; with --full, since that pack
hard-codes the SD1.5 block ids. Layers are counted where the host finds a replacement (that pack keys the
middle block ("middle", 1), the host looks up ("middle", 0): it patches 15 of SD1.5's 16 layers).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch

from tools import comfy_host, factory

SYNC_OPS = ("aten::_local_scalar_dense",)  # what .item(), .cpu() of a scalar, .tolist() end in
# Operators that only make views, allocate or convert to what a tensor already is: they launch no kernel
# on a GPU by themselves (where one does copy, its aten::copy_ is counted).
METADATA_OPS = {"aten::as_strided", "aten::transpose", "aten::view", "aten::empty", "aten::empty_strided",
                "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::expand",
                "aten::permute", "aten::t", "aten::select", "aten::slice", "aten::detach", "aten::alias",
                "aten::_unsafe_view", "aten::split", "aten::chunk", "aten::narrow", "aten::unflatten",
                "aten::flatten", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::empty_like",
                "aten::result_type", "aten::is_nonzero", "aten::contiguous", "aten::unfold", "aten::expand_as",
                "aten::view_as", "aten::resize_", "aten::to", "aten::_to_copy"}  # a copy inside these is counted
CASES = {  # checkpoint, adapter file, latent side
    "tiny": ("checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter-plus_sd15.bin", 8),
    "full": ("checkpoints/sd15_layout.ckpt", "ipadapter/ip-adapter-plus_sd15.bin", 8),
}
IMPLEMENTATIONS = ("ours", "cubiq")


def _computes(event) -> bool:
    """An operator that is not metadata-only, or calls one."""
    return event.name.startswith("aten::") and (event.name not in METADATA_OPS or any(map(_computes, event.cpu_children)))


def lowest_computing(event) -> bool:
    """A computing operator that calls no other (on a GPU, each launches at least one kernel)."""
    return _computes(event) and event.name not in METADATA_OPS and not any(map(_computes, event.cpu_children))


def aten_ops(step) -> Counter:
    """The lowest computing operators of one call (on a GPU each is a kernel launch), and host syncs."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return Counter(event.name for event in prof.events() if event.name in SYNC_OPS or lowest_computing(event))


def patched_layers(model) -> int:
    """How many of the UNet's cross-attention layers have an attn2 replacement the host will find (it looks
    the layer up by (block, id, depth index), then by (block, id))."""
    layers, _ = comfy_host.pack_module("nodes.patch.layers").cross_attention_layers(model)
    replaces = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    return sum(layer.key in replaces or layer.key[:2] in replaces for layer in layers)


@contextlib.contextmanager
def attention_forms_of(device_type: str):
    """Our image attention takes the forms it takes on ``device_type`` (its forms differ between CPU and GPU),
    while running here."""
    attention = comfy_host.pack_module("ipadapter_core.attention")
    chosen = attention.attention_plan
    attention.attention_plan = lambda _, *rest: chosen(device_type, *rest)
    try:
        yield
    finally:
        attention.attention_plan = chosen


def measure(case: str = "tiny", stacks=(1, 2, 4), implementation: str = "ours", forms_of: str = "cuda",
            **options) -> dict:
    """Operators and syncs added per UNet call, and per patched cross-attention layer per adapter, by
    ``implementation`` ("ours", or "cubiq": ComfyUI_IPAdapter_plus, when the host has loaded it), with our
    attention in the forms it takes on ``forms_of`` (by default a GPU's, where the count matters).
    ``options`` go to the Apply step (start_at, end_at, attn_mask; for ours also embeds_scaling, ...)."""
    from bench.harness import Implementations
    checkpoint, adapter_name, side = CASES[case]
    host = comfy_host.import_host(models_dir=factory.models_dir())
    factory.ensure(checkpoint, adapter_name)
    model = host.CheckpointLoaderSimple().load_checkpoint(checkpoint.split("/", 1)[1])[0]
    impl = Implementations({"plus": adapter_name})
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])

    def step_of(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
        return lambda: m.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    with torch.no_grad(), attention_forms_of(forms_of):
        bare = aten_ops(step_of(model))
        result = {"case": case, "implementation": implementation, "bare_ops": sum(bare.values()),
                  "bare_syncs": sum(bare[k] for k in SYNC_OPS), "stacks": []}
        for n in stacks:
            patched = impl.stack(implementation, model, ["plus"] * n, **options)
            layers = patched_layers(patched)
            ops = aten_ops(step_of(patched))
            added = sum(ops.values()) - result["bare_ops"]
            result["layers"] = layers
            result["stacks"].append({"adapters": n, "ops_added": added, "ops_per_layer_per_adapter": added / (layers * n),
                                     "syncs_added": sum(ops[k] for k in SYNC_OPS) - result["bare_syncs"],
                                     "added_by_op": dict((ops - bare).most_common(8))})
    return result


def main(argv: list[str]) -> int:
    from bench.harness import start_host
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full SD1.5 topology (16 layers) instead of the tiny UNet")
    parser.add_argument("--pytorch-attention", action="store_true", help="SDPA, the host's attention on NVIDIA GPUs")
    parser.add_argument("--cubiq", type=Path, help="an unpacked ComfyUI_IPAdapter_plus folder: count it too (use --full)")
    parser.add_argument("--out", type=Path, help="also write the JSON result here (a list, one entry per implementation)")
    args = parser.parse_args(argv)
    start_host(args.cubiq, args.pytorch_attention)
    results = []
    for implementation in IMPLEMENTATIONS[: 2 if args.cubiq else 1]:
        result = measure("full" if args.full else "tiny", implementation=implementation)
        result["attention"] = "pytorch (SDPA)" if args.pytorch_attention else "host default on CPU (sub-quadratic)"
        print(f"{implementation}: {result['case']} UNet, {result['layers']} patched cross-attention layers, "
              f"{result['attention']}: bare step {result['bare_ops']} kernel-launching ops, {result['bare_syncs']} syncs")
        for row in result["stacks"]:
            print(f"  {row['adapters']} adapter(s): +{row['ops_added']} ops "
                  f"({row['ops_per_layer_per_adapter']:.1f} per layer per adapter), +{row['syncs_added']} host syncs")
        results.append(result)
    from bench.harness import write_result
    write_result(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
