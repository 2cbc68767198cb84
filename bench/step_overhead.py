"""Per-step overhead of an IP-Adapter over the bare UNet step, on the full SD1.5 UNet through the host's sampler.

Every variant (bare, ours, ComfyUI_IPAdapter_plus) runs on the same host model and the same adapter file
and CLIP outputs, as one euler step with CFG (batch 2: cond + uncond) through the host's CFGGuider; the
UNet call is timed by forward hooks, in CPU time of this process (torch on one thread; on a machine
shared with other jobs, wall time also counts their time slices) and in wall time. Variants are interleaved round by round (the order rotates), so load
from other processes on the machine falls on all of them alike; each variant's time is divided by the bare
step of the same round, and the median and spread of those ratios are reported.

``--diffusers`` runs the same shapes on diffusers' UNet2DConditionModel (the host model's weights, mapped
with the host's own key map) with ``IPAdapterAttnProcessor2_0``, against that UNet bare.

The FLOP floor is what the image attention adds in arithmetic (4·N·T·C per layer and batch row: Q·Kᵀ and
P·V) over the bare step's FLOPs (counted with torch's FlopCounterMode): the ratio a step would have if time
followed FLOPs.

    .venv/bin/python -m bench.step_overhead --size 256 --set types --rounds 5 --cubiq /tmp/cubiq_pack
    .venv/bin/python -m bench.step_overhead --size 256 --set stacks --rounds 5 --cubiq /tmp/cubiq_pack
    .venv/bin/python -m bench.step_overhead --size 256 --set types --rounds 4 --diffusers
    .venv/bin/python -m bench.step_overhead --size 512 --set types-512 --rounds 3 --cubiq /tmp/cubiq_pack
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import harness

# variant sets: (label, adapter kinds stacked, with mask)
SETS = {
    "types": [("base", ["base"], False), ("plus", ["plus"], False), ("full-face", ["full-face"], False)],
    "stacks": [("plus x2", ["plus"] * 2, False), ("plus x4", ["plus"] * 4, False), ("plus + mask", ["plus"], True)],
    "types-512": [("base", ["base"], False), ("plus", ["plus"], False)],
}
TOKENS = {"base": 4, "plus": 16, "full-face": 257}


def half_mask(size: int) -> torch.Tensor:
    """A MASK [1, H, W]: the left half of the image."""
    mask = torch.zeros(1, size, size)
    mask[:, :, : size // 2] = 1.0
    return mask


def token_counts(size: int) -> dict[int, int]:
    """Latent positions N at each cross-attention width of SD1.5 (the middle block is listed separately)."""
    side = size // 8
    halved = [side]
    for _ in range(3):
        halved.append((halved[-1] + 1) // 2)  # the strided convolutions round up
    return {320: halved[0] ** 2, 640: halved[1] ** 2, 1280: halved[2] ** 2, "middle": halved[3] ** 2}


def added_flops(size: int, kinds: list[str], batch: int = 2) -> int:
    """The image attention's arithmetic per step: 4·N·T·C per layer and batch row, for each adapter."""
    from tools.factory.ipadapters import CROSS_WIDTHS
    n = token_counts(size)
    widths = CROSS_WIDTHS["sd15"]  # processor order: the middle block is last
    per_token = sum(4 * n[c] * c for c in widths[:-1]) + 4 * n["middle"] * widths[-1]
    return batch * per_token * sum(TOKENS[k] for k in kinds)


def bare_flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def run_rounds(variants: dict, rounds: int, timed) -> dict[str, list[tuple[float, float]]]:
    """``timed(name)`` -> (wall s, CPU s) of one step; variants in a rotating order, ``rounds`` times."""
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(name))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1][1]:.2f}s CPU ({times[n][-1][0]:.2f}s wall)"
                                                      for n in names), flush=True)
    return times


def ratios(times: dict[str, list[tuple[float, float]]], bare: str = "bare") -> dict:
    """Per variant: CPU and wall time of the step, and their ratios to the bare step of the same round
    (median and spread). ``seconds``/``ratio`` are CPU time, ``wall_seconds``/``wall_ratio`` wall time."""
    out = {}
    for name, values in times.items():
        row = {}
        for key, index in (("", 1), ("wall_", 0)):
            own = [v[index] for v in values]
            per_round = [v / b[index] for v, b in zip(own, times[bare])]
            row[f"{key}seconds"], row[f"{key}ratio"] = harness.summary(own), harness.summary(per_round)
        out[name] = row
    return out


def host_bench(args) -> dict:
    harness.start_host(args.cubiq, args.pytorch_attention)
    import comfy.samplers
    model = harness.load_unet()
    impl = harness.Implementations()
    mask = half_mask(args.size)
    variants = {"bare": model}
    implementations = ["ours"] + (["cubiq"] if args.cubiq else [])
    for label, kinds, masked in SETS[args.set]:
        for implementation in implementations:
            options = {"attn_mask": mask} if masked else {}
            variants[f"{implementation}: {label}"] = impl.stack(implementation, model, kinds, **options)
    timer = harness.UNetTimer(model.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(2))
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 20)[8:10]  # one mid-schedule euler step
    sampler = comfy.samplers.sampler_object("euler")

    def step(name: str, side: int) -> float:
        guider = comfy.samplers.CFGGuider(variants[name])
        guider.set_conds(positive, negative)
        guider.set_cfg(7.0)
        latent = torch.zeros(1, 4, side, side)
        guider.sample(torch.randn(latent.shape, generator=g), latent, sampler, sigmas, disable_pbar=True, seed=0)
        return timer.take()[0]

    side = args.size // 8
    flops = bare_flops(lambda: step("bare", side))
    times = run_rounds(variants, args.rounds, lambda name: step(name, side))
    result = {"backend": "host", "attention": "pytorch (SDPA)" if args.pytorch_attention else "host CPU default",
              "variants": ratios(times), "bare_flops": flops}
    for label, kinds, _ in SETS[args.set]:
        result.setdefault("flop_floor", {})[label] = 1 + added_flops(args.size, kinds) / flops
    return result


def diffusers_bench(args) -> dict:
    """The same shapes on diffusers' UNet with its IP-Adapter processors, against that UNet bare."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    harness.start_host(None)
    import comfy.utils
    model = harness.load_unet()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    host_sd = model.model.diffusion_model.state_dict()
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    unet.load_state_dict({k: host_sd[mapping[k]].float() for k in unet.state_dict()}, strict=True)
    unet.eval()
    del model, host_sd
    harness.free()
    bare_processors = {name: AttnProcessor2_0() for name in unet.attn_processors}
    impl = harness.Implementations()
    g = torch.Generator().manual_seed(0)
    side = args.size // 8
    x, context, t = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor(500)
    variants = {"bare": (bare_processors, None, None, None)}
    for label, kinds, masked in SETS[args.set]:
        files = [torch.load(harness.factory.models_dir() / harness.ADAPTERS[k], weights_only=True) for k in kinds]
        unet.encoder_hid_proj = None
        unet._load_ip_adapter_weights([{g_: {k: v.float() for k, v in sd.items()} for g_, sd in f.items()}
                                       for f in files])
        processors = {n: p for n, p in unet.attn_processors.items() if not n.startswith("encoder_hid_proj")}
        embeds = [torch.cat(impl.embeds(k)[::-1]).unsqueeze(1) for k in kinds]  # [uncond; cond], one image each
        masks = [half_mask(args.size)[None]] * len(kinds) if masked else None
        variants[f"diffusers: {label}"] = (processors, unet.encoder_hid_proj, embeds, masks)

    def step(name: str) -> float:
        processors, projection, embeds, masks = variants[name]
        unet.encoder_hid_proj = None
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        unet.config.encoder_hid_dim_type = "ip_image_proj" if projection is not None else None
        kwargs = {"added_cond_kwargs": {"image_embeds": embeds}} if embeds is not None else {}
        if masks is not None:
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=context, **kwargs)
        return time.perf_counter() - start[0], time.process_time() - start[1]

    times = run_rounds(variants, args.rounds, step)
    return {"backend": "diffusers", "attention": "SDPA (AttnProcessor2_0)", "variants": ratios(times)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--set", choices=list(SETS), default="types", help="which variants to run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one step per variant each)")
    parser.add_argument("--cubiq", type=Path, help="an unpacked ComfyUI_IPAdapter_plus folder to compare with")
    parser.add_argument("--diffusers", action="store_true", help="diffusers' UNet and IP-Adapter processors instead")
    parser.add_argument("--pytorch-attention", action="store_true", help="the host with SDPA instead of its CPU default")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared machine, 2 threads stall each other)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result = diffusers_bench(args) if args.diffusers else host_bench(args)
    result.update(size=args.size, set=args.set, rounds=args.rounds, machine=harness.machine(),
                  wall_s=round(time.time() - started), peak_rss_mb=round(harness.peak_rss_mb()),
                  command="python -m bench.step_overhead " + " ".join(argv))
    for name, row in result["variants"].items():
        r, w = row["ratio"], row["wall_ratio"]
        print(f"{name:28s} CPU {row['seconds']['median']:7.2f} s  x{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"
              f"   wall {row['wall_seconds']['median']:7.2f} s  x{w['median']:.3f} [{w['min']:.3f}, {w['max']:.3f}]")
    for label, floor in result.get("flop_floor", {}).items():
        print(f"FLOP floor {label}: x{floor:.4f}")
    harness.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
