"""Whole sampler steps on the host's own device: the method of shared/reference/gpu.md, ours against the bare
step and ComfyUI_IPAdapter_plus in one process.

Per variant: wall ms per euler step with CFG (batch 2) through the host's CFGGuider, the device synchronized
in the sampler's callback before each timestamp, variants interleaved round by round; and from the torch
profiler, per step: CUDA kernels, host syncs (``aten::_local_scalar_dense`` and CUDA synchronize calls),
GPU busy time (the sum of kernel durations) and the computing operators (as bench.dispatch_budget counts
them).

    .venv/bin/python -m bench.gpu_step --model sd15 --size 512 --cubiq /tmp/cubiq_pack --out bench/results/gpu_step_sd15_512.json
    .venv/bin/python -m bench.gpu_step --model sdxl --size 1024 --cubiq /tmp/cubiq_pack --out bench/results/gpu_step_sdxl_1024.json

The host is started like ``main.py``: it picks the device and the UNet's dtype (fp16 on NVIDIA GPUs) and
uses SDPA there. ``--cpu`` runs it on the CPU: a check of the bench itself (no kernels, no GPU time; the
tests run it so with ``--model tiny``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import harness
from bench.dispatch_budget import SYNC_OPS, lowest_computing, patched_layers

MODELS = {  # checkpoint, text width, adapter kind -> file
    "tiny": ("checkpoints/tiny_sd15.ckpt", 768, {"base": "ipadapter/tiny_ip-adapter_sd15.bin",
                                                 "plus": "ipadapter/tiny_ip-adapter-plus_sd15.bin",
                                                 "full-face": "ipadapter/tiny_ip-adapter-full-face_sd15.bin"}),
    "sd15": ("checkpoints/sd15_layout.ckpt", 768, {"base": "ipadapter/ip-adapter_sd15.bin",
                                                   "plus": "ipadapter/ip-adapter-plus_sd15.bin",
                                                   "full-face": "ipadapter/ip-adapter-full-face_sd15.bin"}),
    "sdxl": ("checkpoints/sdxl_layout.ckpt", 2048, {"base": "ipadapter/ip-adapter_sdxl_vit-h.bin",
                                                    "plus": "ipadapter/ip-adapter-plus_sdxl_vit-h.bin"}),
}
STACKS = {"base": ["base"], "plus": ["plus"], "full-face": ["full-face"], "plus x4": ["plus"] * 4}
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
PROFILED_STEPS = 2  # the profiler sees one sampler run of this many steps; its counts are divided by it


def device_synchronizer():
    """What waits for the host's device to finish its queued work (nothing to wait for on the CPU)."""
    import comfy.model_management
    return torch.cuda.synchronize if comfy.model_management.get_torch_device().type == "cuda" else (lambda: None)


def device_name() -> str:
    """The host's device, as absolute times are labelled: the GPU's name, or the CPU's description."""
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else harness.machine()


def profile_step(run) -> dict:
    """Kernels, host syncs, GPU busy ms and computing operators of one ``run()`` (after a warm-up run)."""
    run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    return {"kernels": len(kernels), "gpu_busy_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
            "syncs": sum(e.name in SYNC_OPS or e.name in CUDA_SYNCS for e in cpu),
            "operators": sum(map(lowest_computing, cpu))}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per timed run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of one timed run per variant")
    parser.add_argument("--cubiq", type=Path, help="an unpacked ComfyUI_IPAdapter_plus folder to compare with")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the bench)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.time()
    harness.start_host(args.cubiq, cpu=args.cpu)
    import comfy.samplers
    checkpoint, text_width, files = MODELS[args.model]
    model = harness.load_unet(checkpoint)
    impl = harness.Implementations(files)
    variants, adapters = {"bare": model}, {"bare": 0}
    for implementation in ["ours"] + (["cubiq"] if args.cubiq else []):
        for label, kinds in STACKS.items():
            if all(kind in files for kind in kinds):
                name = f"{implementation}: {label}"
                variants[name], adapters[name] = impl.stack(implementation, model, kinds), len(kinds)

    synchronize = device_synchronizer()
    g = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 77, text_width, generator=g),
                            {"pooled_output": torch.randn(1, 1280, generator=g)}]] for _ in range(2))
    side = args.size // 8
    sampler = comfy.samplers.sampler_object("euler")
    sampling = model.get_model_object("model_sampling")

    def sample(name: str, steps: int, stamps: list | None = None) -> None:
        guider = comfy.samplers.CFGGuider(variants[name])
        guider.set_conds(positive, negative)
        guider.set_cfg(7.0)
        latent = torch.zeros(1, 4, side, side)
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)

        def callback(*_):
            synchronize()
            stamps.append(time.perf_counter())
        guider.sample(torch.randn(latent.shape, generator=g), latent, sampler, sigmas, disable_pbar=True, seed=0,
                      callback=callback if stamps is not None else None)

    per_step = {name: {key: value / PROFILED_STEPS for key, value in profile_step(
        lambda name=name: sample(name, PROFILED_STEPS)).items()} for name in variants}
    walls = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            stamps: list[float] = []
            sample(name, args.steps, stamps)
            walls[name] += [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..n: the first warms up
        print(f"round {r + 1}/{args.rounds}", flush=True)

    bare_wall = harness.summary(walls["bare"])["median"]
    rows = {}
    for name in names:
        wall, own, bare = harness.summary(walls[name]), per_step[name], per_step["bare"]
        rows[name] = {"wall_ms": {k: (v * 1e3 if k != "n" else v) for k, v in wall.items()},
                      "wall_added_pct": 100 * (wall["median"] / bare_wall - 1),
                      "adapters": adapters[name], "patched_layers": patched_layers(variants[name]), **own}
        print(f"{name:24s} {wall['median'] * 1e3:8.2f} ms/step ({rows[name]['wall_added_pct']:+6.1f} %), "
              f"{own['kernels']:6.0f} kernels (+{own['kernels'] - bare['kernels']:.0f}), "
              f"{own['syncs']:4.0f} syncs (+{own['syncs'] - bare['syncs']:.0f}), "
              f"GPU busy {own['gpu_busy_ms']:7.2f} ms, {own['operators']:6.0f} operators", flush=True)
    result = {"model": args.model, "size": args.size, "steps": args.steps, "rounds": args.rounds,
              "device": device_name(), "dtype": str(model.model.get_dtype()), "variants": rows,
              "wall_s": round(time.time() - started), "command": "python -m bench.gpu_step " + " ".join(argv)}
    harness.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
