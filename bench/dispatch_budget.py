"""Dispatch budget of the IP-Adapter patch: operators and host syncs it adds to one UNet step.

On a GPU the host's sampler step is bound by kernel launches (shared/reference/gpu.md), so an adapter's
cost there is what it adds in operators (each at least one kernel launch) and host syncs. Both are
counted with the torch profiler on the CPU, identically on any machine: one batch-2 UNet call
(uncond + cond), bare against patched with 1, 2 and 4 stacked adapters, after a warm-up call (image
K/V are computed once per run, not per step).

    .venv/bin/python -m bench.dispatch_budget [--full] [--pytorch-attention] [--out FILE]

--pytorch-attention uses SDPA, the host's attention on NVIDIA GPUs (the CPU default is sub-quadratic).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from tools import comfy_host, factory

SYNC_OPS = ("aten::_local_scalar_dense",)  # what .item(), .cpu() of a scalar, .tolist() end in
# Operators that only make views or allocate: they launch no kernel on a GPU.
METADATA_OPS = {"aten::as_strided", "aten::transpose", "aten::view", "aten::empty", "aten::empty_strided",
                "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::expand",
                "aten::permute", "aten::t", "aten::select", "aten::slice", "aten::detach", "aten::alias",
                "aten::_unsafe_view", "aten::split", "aten::chunk", "aten::narrow", "aten::unflatten",
                "aten::flatten", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::empty_like",
                "aten::result_type", "aten::is_nonzero", "aten::contiguous"}
CASES = {  # checkpoint, adapter file, latent side
    "tiny": ("checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter-plus_sd15.bin", 8),
    "full": ("checkpoints/sd15_layout.ckpt", "ipadapter/ip-adapter-plus_sd15.bin", 8),
}


def _computes(event) -> bool:
    """An operator that is not metadata-only, or calls one."""
    return event.name.startswith("aten::") and (event.name not in METADATA_OPS or any(map(_computes, event.cpu_children)))


def aten_ops(step) -> Counter:
    """The lowest computing operators of one call (on a GPU each is a kernel launch), and host syncs."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    counts = Counter()
    for event in prof.events():
        if event.name in SYNC_OPS or (_computes(event) and event.name not in METADATA_OPS
                                      and not any(map(_computes, event.cpu_children))):
            counts[event.name] += 1
    return counts


def measure(case: str = "tiny", stacks=(1, 2, 4), **options) -> dict:
    """Operators and syncs added per UNet call, and per cross-attention layer per adapter.
    ``options`` go to the Apply nodes' spec (start_at, end_at, attn_mask, embeds_scaling, ...)."""
    checkpoint, adapter_name, side = CASES[case]
    host = comfy_host.import_host(models_dir=factory.models_dir())
    models = factory.ensure(checkpoint, adapter_name)
    model = host.CheckpointLoaderSimple().load_checkpoint(checkpoint.split("/", 1)[1])[0]
    loader, projection = comfy_host.pack_module("ipadapter_core.loader"), comfy_host.pack_module("ipadapter_core.projection")
    glue, patch = comfy_host.pack_module("nodes.ipadapter_nodes"), comfy_host.pack_module("nodes.ipadapter_patch")
    adapter = loader.load_adapter(models / adapter_name)
    loaded = glue.LoadedAdapter(adapter, projection.build_projection(adapter.variant, adapter.image_proj))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond, uncond = (loaded.projection(torch.randn(1, 257, adapter.variant.embed_dim, generator=g)) for _ in range(2))
    spec = glue.adapter_spec(model, loaded, cond, uncond, 1.0, **options)
    x, context = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])

    def step_of(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
        return lambda: m.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    with torch.no_grad():
        bare = aten_ops(step_of(model))
        layers = len(adapter.layer_widths)
        result = {"case": case, "layers": layers, "bare_ops": sum(bare.values()),
                  "bare_syncs": sum(bare[k] for k in SYNC_OPS), "stacks": []}
        patched = model
        for n in range(1, max(stacks) + 1):
            patched = patch.patch_model(patched, adapter, spec)
            if n not in stacks:
                continue
            ops = aten_ops(step_of(patched))
            added = sum(ops.values()) - result["bare_ops"]
            result["stacks"].append({"adapters": n, "ops_added": added, "ops_per_layer_per_adapter": added / (layers * n),
                                     "syncs_added": sum(ops[k] for k in SYNC_OPS) - result["bare_syncs"],
                                     "added_by_op": dict((ops - bare).most_common(8))})
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full SD1.5 topology (16 layers) instead of the tiny UNet")
    parser.add_argument("--pytorch-attention", action="store_true", help="SDPA, the host's attention on NVIDIA GPUs")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    comfy_host.import_host(models_dir=factory.models_dir(), load_nodes=False, pytorch_attention=args.pytorch_attention)
    result = measure("full" if args.full else "tiny")
    result["attention"] = "pytorch (SDPA)" if args.pytorch_attention else "host default on CPU (sub-quadratic)"
    print(f"{result['case']} UNet, {result['layers']} cross-attention layers, {result['attention']}: "
          f"bare step {result['bare_ops']} kernel-launching ops, {result['bare_syncs']} syncs")
    for row in result["stacks"]:
        print(f"  {row['adapters']} adapter(s): +{row['ops_added']} ops "
              f"({row['ops_per_layer_per_adapter']:.1f} per layer per adapter), +{row['syncs_added']} host syncs")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
