"""Dispatch budget and CPU overhead of the Flux image prompts: what they add to one step of the reduced Flux model.

The factory's FLUX.1-dev layout (real widths, 2 double- and 1 single-stream blocks), 64 image tokens and 5 text
tokens per latent, batch 1 (Flux's guidance-distilled single pass) or 2 (real CFG). Operators (each at least one
kernel launch on a GPU) and host syncs are counted with the torch profiler as in bench.dispatch_budget, with our
image attention in the forms it takes on a GPU, after a warm-up call; per patched block and adapter (XLabs' adapters
patch the double-stream blocks, InstantX's every block). The
CPU overhead is the median of interleaved calls' CPU time (torch on one thread), patched over bare, in one run;
beside it the FLOP ratio (torch's FlopCounterMode), what the step would cost if time followed arithmetic.

    .venv/bin/python -m bench.flux_budget [--rounds N] [--device] [--out FILE]

``--device`` runs on the device the host picks (a GPU on the lent machine, in the dtype the host picks there, SDPA): the
operator counts are then the kernels and syncs of that run, and the times are wall times after a synchronize.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.dispatch_budget import SYNC_OPS, aten_ops, attention_forms_of
from tools import comfy_host, factory

MODEL = f"diffusion_models/{factory.FLUX_FILE}"
ADAPTERS = {"v1": "ipadapter/flux-ip-adapter.bin", "v2": "ipadapter/flux-ip-adapter-v2.bin",
            "instantx": f"ipadapter/{factory.INSTANTX_FLUX_FILE}"}
LATENT_HW = (16, 16)


class FluxBench:
    """The reduced Flux model in the in-process host, and adapters applied to it as the Apply nodes apply them."""

    def __init__(self):
        import comfy.model_management
        host = comfy_host.import_host(models_dir=factory.models_dir())
        factory.ensure(MODEL, *ADAPTERS.values())
        (self.model,) = host.UNETLoader().load_unet(factory.FLUX_FILE, "default")
        self.device = comfy.model_management.get_torch_device()
        if self.device.type != "cpu":
            comfy.model_management.load_models_gpu([self.model])  # where the sampler would put it
        self.encode = comfy_host.pack_module("nodes.ipadapter_encode")
        self.apply = comfy_host.pack_module("nodes.ipadapter_apply")
        self.options = comfy_host.pack_module("ipadapter_core.apply_options").ApplyOptions
        flux = self.model.get_model_object("diffusion_model")
        self.double_blocks, self.all_blocks = len(flux.double_blocks), len(flux.double_blocks) + len(flux.single_blocks)

    def blocks(self, versions: list[str]) -> int:
        """The blocks these adapters patch."""
        return self.all_blocks if "instantx" in versions else self.double_blocks

    def patched(self, versions: list[str], **inputs):
        """The model with one adapter per entry of ``versions`` (keys of ADAPTERS), random image embeds each."""
        model, g = self.model, torch.Generator().manual_seed(0)
        for version in versions:
            adapter = self.encode.load(str(factory.models_dir() / ADAPTERS[version]))
            embeds = torch.randn(1, adapter.file.variant.embed_dim, generator=g)
            cond, uncond = self.encode.image_tokens(adapter, embeds)
            model = self.apply.apply_tokens(model, adapter, cond, uncond, self.options.from_inputs(1.0, **inputs))
        return model

    def step(self, model, batch: int):
        """One call of the transformer as the sampler makes it (wrappers included), on fixed inputs."""
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 16, *LATENT_HW, generator=g)
        context, y = torch.randn(batch, 5, 4096, generator=g), torch.randn(batch, 768, generator=g)
        t, guidance = torch.full((batch,), 0.5), torch.full((batch,), 3.5)
        x, context, y, t, guidance = (v.to(self.device) for v in (x, context, y, t, guidance))
        flux, sigmas = model.model.diffusion_model, torch.full((1,), 0.5, device=self.device)

        def call():  # a new sigma tensor per call, as each sampler step has: per-step work is redone
            options = dict(model.model_options["transformer_options"], cond_or_uncond=[1, 0][-batch:],
                           sigmas=sigmas.clone(), wrappers=model.wrappers)
            return flux(x, t, context, y=y, guidance=guidance, transformer_options=options)
        return call


def dispatch(bench: FluxBench, cases: dict[str, list[str]], batch: int = 2, **inputs) -> dict:
    """Operators and syncs added per step by each case (a list of adapter versions) over the bare model."""
    with torch.no_grad(), attention_forms_of("cuda"):  # a GPU's forms, also when counted on the CPU
        bare = aten_ops(bench.step(bench.model, batch))
        result = {"batch": batch, "blocks": bench.double_blocks, "all_blocks": bench.all_blocks,
                  "bare_ops": sum(bare.values()),
                  "bare_syncs": sum(bare[k] for k in SYNC_OPS), "cases": {}}
        for name, versions in cases.items():
            ops = aten_ops(bench.step(bench.patched(versions, **inputs), batch))
            added = sum(ops.values()) - result["bare_ops"]
            result["cases"][name] = {"adapters": len(versions), "ops_added": added,
                                     "blocks": bench.blocks(versions), "ops_per_block": added / bench.blocks(versions),
                                     "syncs_added": sum(ops[k] for k in SYNC_OPS) - result["bare_syncs"],
                                     "added_by_op": dict((ops - bare).most_common(10))}
    return result


def flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def seconds(call, device: torch.device) -> float:
    """How long one ``call()`` takes: CPU time on the CPU, wall time between two synchronizes on a GPU."""
    gpu = device.type == "cuda"
    clock = time.perf_counter if gpu else time.process_time
    if gpu:
        torch.cuda.synchronize()
    start = clock()
    call()
    if gpu:
        torch.cuda.synchronize()
    return clock() - start


def interleaved(calls: dict, rounds: int, device: torch.device) -> dict:
    """Median time in ms of each of two ``calls`` (name -> call; the first is the baseline), run interleaved for
    ``rounds``, and the median and range of the second's ratio over the first's per round."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    baseline, candidate = times.values()
    ratios = sorted(c / b for b, c in zip(baseline, candidate))
    return {"rounds": rounds, **{f"{name}_ms": statistics.median(values) * 1000 for name, values in times.items()},
            "ratio": statistics.median(ratios), "ratio_range": [ratios[0], ratios[-1]]}


def overhead(bench: FluxBench, versions: list[str], rounds: int, batch: int = 2) -> dict:
    """Time of a bare and a patched step (median of ``rounds``, interleaved; CPU time on the CPU, wall time after a
    synchronize on a GPU), and their FLOPs."""
    bare, patched = bench.step(bench.model, batch), bench.step(bench.patched(versions), batch)
    with torch.no_grad():
        counted = {"bare": flops(bare), "patched": flops(patched)}  # also the warm-up
        timed = interleaved({"bare": bare, "patched": patched}, rounds, bench.device)
    return {"adapters": versions, "device": str(bench.device), **timed,
            "flop_ratio": counted["patched"] / counted["bare"]}


def start(argv: list[str], doc: str) -> argparse.Namespace:
    """The DiT budget benches' arguments (--rounds, --device, --out), and the host started as they say (torch on one
    thread)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the CPU overhead (default 5)")
    parser.add_argument("--device", action="store_true", help="on the device the host picks (a GPU), with SDPA")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comfy_host.import_host(models_dir=factory.models_dir(), load_nodes=False, cpu=not args.device,
                           pytorch_attention=args.device)
    return args


def main(argv: list[str]) -> int:
    from bench.harness import write_result
    args = start(argv, __doc__)
    bench = FluxBench()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    result = {"dispatch": dispatch(bench, {"v1": ["v1"], "v2": ["v2"], "v1 x2": ["v1", "v1"], "v1 + v2": ["v1", "v2"],
                                           "instantx": ["instantx"], "instantx x2": ["instantx", "instantx"]}),
              "dispatch_masked_gated": dispatch(bench, {"v1": ["v1"], "instantx": ["instantx"]}, attn_mask=mask,
                                                start_at=0.1, end_at=0.9),
              "cpu_overhead": overhead(bench, ["v1"], args.rounds),
              "cpu_overhead_instantx": overhead(bench, ["instantx"], args.rounds)}
    d = result["dispatch"]
    print(f"Flux step, batch {d['batch']}, {d['blocks']} double- and {d['all_blocks'] - d['blocks']} single-stream "
          f"blocks: bare {d['bare_ops']} kernel-launching ops, {d['bare_syncs']} syncs")
    for name, row in [*d["cases"].items(), *((f"{n} masked + start/end", r) for n, r in
                                             result["dispatch_masked_gated"]["cases"].items())]:
        print(f"  {name}: +{row['ops_added']} ops ({row['ops_per_block']:.1f} per block of {row['blocks']}), "
              f"+{row['syncs_added']} syncs")
    for o in (result["cpu_overhead"], result["cpu_overhead_instantx"]):
        print(f"step on {o['device']}: bare {o['bare_ms']:.0f} ms, one {o['adapters'][0]} adapter {o['patched_ms']:.0f} ms:"
              f" x{o['ratio']:.3f} [{o['ratio_range'][0]:.3f}, {o['ratio_range'][1]:.3f}] over {o['rounds']} rounds; "
              f"FLOPs x{o['flop_ratio']:.4f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
