"""Instruction edit: our InstructEditGuider against the host's DualCFGGuider on the same edit model, step time.

Both guide with a text scale 7.5 and an image scale 1.5 over the same three conditionings (text + image,
null text + image, null text + zero image), each a batch-3 UNet call per step. With a guidance interval
(image guidance on the first 30 % of the schedule only), a step outside it skips the null branch (batch 2);
the host's two-way CFGGuider on the same model shows what a batch-2 step costs. Steps are timed from the
sampler's callback (the whole step: guidance, UNet, sampler update), two euler steps per visit, the second
timed, in CPU time of this process and in wall time (see bench.step_overhead); guiders are interleaved round by round and each is divided by DualCFGGuider of the same round.

    .venv/bin/python -m bench.edit_guider --unet tiny --size 256 --rounds 8
    .venv/bin/python -m bench.edit_guider --unet full --size 256 --rounds 3

``tiny`` is the factory's tiny_sd15_ip2p.ckpt (26 M UNet: the guider's own work weighs most there);
``full`` builds the full SD1.5 topology with 8 input channels in memory (random weights, not written).

``--device`` runs on the device the host picks, as ``main.py`` would (a GPU, the UNet in fp16; the CPU where
there is no accelerator): the device is synchronized before each timestamp, and the torch profiler adds
kernels, host syncs and GPU busy time per step (bench.gpu_step's counts):

    python -m bench.edit_guider --unet full --size 512 --rounds 20 --device
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import gpu_step, harness
from bench.step_overhead import ratios, run_rounds

TEXT_SCALE, IMAGE_SCALE = 7.5, 1.5
INTERVAL_END = 0.3  # image guidance on the first 30 % of the schedule
TIMED_SIGMAS = slice(10, 13)  # two euler steps at 50-60 % of a 20-step schedule: outside the interval


def edit_model(unet: str):
    import comfy.sd
    if unet == "tiny":
        return harness.load_unet("checkpoints/tiny_sd15_ip2p.ckpt")
    from tools.factory import host_models
    state_dict = host_models.sd15_checkpoint(dict(host_models.SD15_UNET, in_channels=8), seed=2)
    return comfy.sd.load_state_dict_guess_config(state_dict, output_vae=False, output_clip=False)[0]


def guiders(model, side: int):
    """name -> a guider over the same conditionings."""
    import comfy.samplers
    import node_helpers
    import nodes
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    g = torch.Generator().manual_seed(0)
    text, null = ([[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(2))
    image_latent = torch.randn(1, 4, side, side, generator=g)
    positive, image_only, negative, *_ = nodes.NODE_CLASS_MAPPINGS["InstructEditConditioning"].execute(
        positive=text, negative=null, latent={"samples": image_latent}).result
    ours = nodes.NODE_CLASS_MAPPINGS["InstructEditGuider"]

    def our_guider(**options):
        return ours.execute(model=model, positive=positive, image_only=image_only, negative=negative,
                            text_scale=TEXT_SCALE, image_scale=IMAGE_SCALE, **options).result[0]

    dual = Guider_DualCFG(model)
    with_image = {"concat_latent_image": image_latent}
    dual.set_conds(node_helpers.conditioning_set_values(text, with_image),
                   node_helpers.conditioning_set_values(null, with_image), null)
    dual.set_cfg(TEXT_SCALE, IMAGE_SCALE)
    two_way = comfy.samplers.CFGGuider(model)
    two_way.set_conds(positive, image_only)
    two_way.set_cfg(TEXT_SCALE)
    return {"host DualCFGGuider": dual, "ours": our_guider(),
            f"ours, interval 0-{INTERVAL_END}, step outside": our_guider(image_guidance_end=INTERVAL_END),
            "host CFGGuider (2 conds)": two_way}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: see bench.step_overhead)")
    parser.add_argument("--device", action="store_true", help="on the device the host picks (a GPU), with its counts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.device:
        torch.set_num_threads(args.threads)
    started = time.time()
    harness.start_host(cpu=not (args.device and torch.accelerator.is_available()))
    import comfy.samplers
    model = edit_model(args.unet)
    side = args.size // 8
    variants = guiders(model, side)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[TIMED_SIGMAS]
    sampler = comfy.samplers.sampler_object("euler")
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))

    synchronize = gpu_step.device_synchronizer()

    def visit(name: str, callback=None) -> None:
        variants[name].sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True,
                              callback=callback)

    def step(name: str) -> tuple[float, float]:
        stamps = []

        def stamp(*_):
            synchronize()
            stamps.append((time.perf_counter(), time.process_time()))
        visit(name, stamp)
        return stamps[1][0] - stamps[0][0], stamps[1][1] - stamps[0][1]

    times = run_rounds(variants, args.rounds, step)
    result = {"unet": args.unet, "size": args.size, "rounds": args.rounds, "variants": ratios(times, "host DualCFGGuider"),
              "machine": gpu_step.device_name() if args.device else harness.machine(),
              "dtype": str(model.model.get_dtype()), "command": "python -m bench.edit_guider " + " ".join(argv)}
    if args.device:  # the profiler sees the two euler steps of one visit
        steps = len(sigmas) - 1
        for name, row in result["variants"].items():
            row.update({key: value / steps for key, value in gpu_step.profile_step(lambda name=name: visit(name)).items()})
    result["wall_s"] = round(time.time() - started)
    for name, row in result["variants"].items():
        r, w = row["ratio"], row["wall_ratio"]
        counts = (f"   {row['kernels']:.0f} kernels, {row['syncs']:.0f} syncs, GPU busy {row['gpu_busy_ms']:.2f} ms"
                  if args.device else "")
        print(f"{name:40s} CPU {row['seconds']['median']:7.3f} s  x{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"
              f"   wall {row['wall_seconds']['median']:7.3f} s  x{w['median']:.3f} [{w['min']:.3f}, {w['max']:.3f}]"
              + counts)
    harness.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
