"""What an IP-Adapter adds to one SD1.5 UNet step, measured where it acts: the cross-attention layers.

A step with an adapter differs from the bare step only in its 16 cross-attention layers (the host computes
Q, K, V and the output projection either way), so the per-step overhead is the sum over those layers of
(patched attention - plain attention), plus what runs once per step outside them (diffusers re-runs the
image projection on every forward). Both are timed here on the real layer shapes (batch 2, the latent of
``--size``) in CPU time of this process, many times over and interleaved, which resolves fractions of a
percent that whole-step timings on a shared machine cannot (see bench.step_overhead); the overhead is then
given over the bare UNet step's CPU time, measured in the same run.

With ``--image-only`` every implementation's text attention returns a result computed beforehand (the host's
own, per layer), so a sweep times only what the adapter adds and each figure is one timing, not the
difference of two: steadier where the plain attention is large (512 px). The plain attention is the same call
in the patched and the bare layer (both packs pass the host's attention the same q, k, v), so the two ways
measure the same cost.

- ours: the attn2 replacement our EMBEDS apply path registers on the full SD1.5 host model;
- ComfyUI_IPAdapter_plus (``--cubiq DIR``): the replacement its IPAdapterEmbeds node registers on the same
  model, file and CLIP outputs (it keys the middle block ("middle", 1), which the host never looks up: that
  layer runs unpatched, as it does in the host);
- diffusers: ``IPAdapterAttnProcessor2_0`` against ``AttnProcessor2_0`` on an ``Attention`` of each layer's
  shape with the file's to_k_ip/to_v_ip, plus ``MultiIPAdapterImageProjection`` once per step;
- FLOP floor: the image attention's arithmetic over the bare step's FLOPs (bench.step_overhead).

    .venv/bin/python -m bench.patch_cost --size 256 --cubiq /tmp/cubiq_pack
    .venv/bin/python -m bench.patch_cost --size 512 --cubiq /tmp/cubiq_pack --image-only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import harness
from bench.step_overhead import SETS, added_flops, bare_flops, half_mask, token_counts

VARIANTS = SETS["types"] + SETS["stacks"]


def layer_inputs(model, size: int):
    """[(host layer key, transformer options, q, k, v)] for the 16 cross-attention layers at ``size``."""
    layers, _ = harness.comfy_host.pack_module("nodes.patch.layers").cross_attention_layers(model)
    heads = model.model.model_config.unet_config["num_heads"]
    n_of = token_counts(size)
    side = size // 8
    g = torch.Generator().manual_seed(0)
    inputs = []
    for layer in layers:
        n = n_of["middle" if layer.key[0] == "middle" else layer.width]
        options = {"n_heads": heads, "dim_head": layer.width // heads, "block": layer.key[:2], "block_index": layer.key[2],
                   "transformer_index": layer.transformer_index, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]),
                   "original_shape": [2, 4, side, side], "attn_precision": None}
        inputs.append((layer.key, options, *(torch.randn(2, m, layer.width, generator=g) for m in (n, 77, 77))))
    return inputs


def text_given(inputs):
    """The host's attention, except that for a layer's own text K/V it returns that layer's plain attention
    result, computed here once: what a patch adds on top of it is then all that runs."""
    from comfy.ldm.modules.attention import optimized_attention
    given = {(q.data_ptr(), k.data_ptr()): optimized_attention(q, k, v, options["n_heads"])
             for _, options, q, k, v in inputs}

    def attention(q, k, v, heads, **options):
        result = given.get((q.data_ptr(), k.data_ptr()))
        if result is None:
            return optimized_attention(q, k, v, heads, **options)
        attention.given += 1
        return result
    attention.given = 0
    return attention


def host_sweeps(model, impl: harness.Implementations, inputs, implementations, mask, image_only: bool) -> dict:
    """name -> a function running every layer's attention once, as the host would (bare or patched); with
    ``image_only``, no bare sweep, and the patched layers' text attention is given (``text_given``)."""
    from comfy.ldm.modules.attention import optimized_attention

    def bare():
        for _, options, q, k, v in inputs:
            optimized_attention(q, k, v, options["n_heads"])

    sweeps = {} if image_only else {"bare": bare}
    attention = text_given(inputs) if image_only else optimized_attention
    for implementation in implementations:
        for label, kinds, masked in VARIANTS:
            patched = impl.stack(implementation, model, kinds, **({"attn_mask": mask} if masked else {}))
            replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
            calls = [(replaces.get(key, replaces.get(key[:2])), options, q, k, v) for key, options, q, k, v in inputs]
            if image_only:
                calls = [call for call in calls if call[0] is not None]  # a layer left unpatched adds nothing
                for patch, *_ in calls:
                    if implementation == "ours":
                        patch.attention = attention
                    else:  # its text and image attention calls look the host's function up in its module
                        sys.modules[type(patch).__module__].optimized_attention = attention

            def sweep(calls=calls):
                for patch, options, q, k, v in calls:
                    if patch is None:  # a layer the implementation leaves unpatched
                        optimized_attention(q, k, v, options["n_heads"])
                    else:
                        patch(q, k, v, dict(options))
            if image_only:  # every patched layer must have taken its text attention as given
                given = attention.given
                with torch.no_grad():
                    sweep()
                if attention.given - given != len(calls):
                    raise RuntimeError(f"--image-only: {implementation}: {label} computed its own text attention "
                                       f"({attention.given - given} of {len(calls)} layers took it as given)")
            sweeps[f"{implementation}: {label}"] = sweep
    return sweeps


def diffusers_sweeps(impl: harness.Implementations, inputs, size: int) -> dict:
    """diffusers' attention processors on the same shapes: bare, and each variant with its projection."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection
    from tools import factory
    converter = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                                     up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(32,), layers_per_block=1,
                                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8)
    heads = inputs[0][1]["n_heads"]
    modules = [Attention(q.shape[-1], cross_attention_dim=768, heads=heads, dim_head=q.shape[-1] // heads).eval()
               for _, _, q, _, _ in inputs]
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 77, 768, generator=g)
    states = [q for _, _, q, _, _ in inputs]

    def run(processors, encoder_states, kwargs):
        for module, processor, hidden in zip(modules, processors, states):
            processor(module, hidden, encoder_hidden_states=encoder_states, **kwargs)

    plain = [AttnProcessor2_0() for _ in modules]
    sweeps = {"diffusers bare": lambda: run(plain, text, {})}
    files, projections = {}, {}  # one float copy of each adapter kind, shared by the variants stacking it
    for kind in {k for _, kinds, _ in VARIANTS for k in kinds}:
        state = torch.load(factory.models_dir() / harness.ADAPTERS[kind], weights_only=True)
        files[kind] = {group: {k: v.float() for k, v in sd.items()} for group, sd in state.items()}
        projections[kind] = converter._convert_ip_adapter_image_proj_to_diffusers(files[kind]["image_proj"]).eval()
    for label, kinds, masked in VARIANTS:
        projection = MultiIPAdapterImageProjection([projections[k] for k in kinds]).eval()
        embeds = [torch.cat(impl.embeds(k)[::-1]).unsqueeze(1) for k in kinds]  # [uncond; cond], one image each
        with torch.no_grad():
            tokens = tuple(state.shape[-2] for state in projection(embeds))
        processors = []
        for i, module in enumerate(modules):
            processor = IPAdapterAttnProcessor2_0(module.to_q.out_features, 768, num_tokens=tokens, scale=[1.0] * len(kinds))
            for a, kind in enumerate(kinds):
                processor.to_k_ip[a].weight.data = files[kind]["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"]
                processor.to_v_ip[a].weight.data = files[kind]["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"]
            processors.append(processor.eval())
        kwargs = {"ip_adapter_masks": [half_mask(size)[None]] * len(kinds)} if masked else {}

        def sweep(processors=processors, projection=projection, embeds=embeds, kwargs=kwargs):
            run(processors, (text, projection(embeds)), kwargs)  # the projection runs on every UNet forward
        sweeps[f"diffusers: {label}"] = sweep
    return sweeps


def interleave(sweeps: dict, rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each sweep, ``rounds`` times in a rotating order."""
    names = list(sweeps)
    times = {name: [] for name in names}
    with torch.no_grad():
        for fn in sweeps.values():  # warm-up: per-run caches (image K/V, mask grids) are made here
            fn()
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.process_time()
                sweeps[name]()
                times[name].append(time.process_time() - start)
            print(f"round {r + 1}/{rounds}", flush=True)
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--bare-steps", type=int, default=2, help="bare UNet steps timed for the denominator")
    parser.add_argument("--cubiq", type=Path, help="an unpacked ComfyUI_IPAdapter_plus folder to compare with")
    parser.add_argument("--only", choices=("host", "diffusers"),
                        help="only the host's patches (ours, cubiq) or only diffusers' processors (less memory)")
    parser.add_argument("--image-only", action="store_true",
                        help="time only what the patches add: their text attention is given (see above)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see bench.step_overhead)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    harness.start_host(args.cubiq)
    model = harness.load_unet()
    side = args.size // 8
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 77, 768, generator=g)

    def unet_step():
        model.model.diffusion_model(x, timesteps=torch.tensor([500.0, 500.0]), context=context,
                                    transformer_options={"cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0])})
    bare_step = []
    with torch.no_grad():
        flops = bare_flops(unet_step)
        for _ in range(args.bare_steps):
            start = time.process_time()
            unet_step()
            bare_step.append(time.process_time() - start)
    step_s = statistics.median(bare_step)
    # The patches need the model's layout, not its weights: drop them (3.4 GB) before building the patches.
    model.model.diffusion_model.to_empty(device="meta")
    harness.free()

    impl = harness.Implementations()
    inputs = layer_inputs(model, args.size)
    implementations = [] if args.only == "diffusers" else ["ours"] + (["cubiq"] if args.cubiq else [])
    sweeps = host_sweeps(model, impl, inputs, implementations, half_mask(args.size), args.image_only)
    if args.only != "host":
        sweeps.update(diffusers_sweeps(impl, inputs, args.size))
    times = interleave(sweeps, args.rounds)

    rows, added = {}, {}
    for name, values in times.items():
        if "bare" in name:
            continue
        implementation, label = name.split(": ", 1)
        bare = times.get("diffusers bare" if implementation == "diffusers" else "bare", [0.0] * len(values))
        added[name] = [v - b for v, b in zip(values, bare)]  # image-only sweeps: the time itself
        q = harness.summary(added[name])
        rows[name] = {"added_ms": {k: (v * 1e3 if k != "n" else v) for k, v in q.items()},
                      "overhead_pct": 100 * q["median"] / step_s, "overhead_pct_q1": 100 * q["q1"] / step_s,
                      "overhead_pct_q3": 100 * q["q3"] / step_s}
    for name, row in rows.items():  # ours over the other pack, round by round (the rounds are interleaved)
        theirs = added.get(name.replace("ours: ", "cubiq: ", 1)) if name.startswith("ours: ") else None
        if theirs:
            row["vs_cubiq"] = harness.summary([a / b for a, b in zip(added[name], theirs)])
    floors = {label: 100 * added_flops(args.size, kinds) / flops for label, kinds, _ in VARIANTS}
    result = {"size": args.size, "rounds": args.rounds, "bare_step_cpu_s": step_s, "bare_step_cpu_s_all": bare_step,
              "bare_flops": flops, "flop_floor_pct": floors, "variants": rows,
              "image_only": args.image_only, "machine": harness.machine(),
              "wall_s": round(time.time() - started), "peak_rss_mb": round(harness.peak_rss_mb()),
              "command": "python -m bench.patch_cost " + " ".join(argv)}
    if "bare" in times:
        result["bare_layers_ms"] = 1e3 * statistics.median(times["bare"])
        print(f"bare cross-attention {result['bare_layers_ms']:.1f} ms")
    print(f"bare UNet step {step_s:.2f} s CPU at {args.size} px")
    for name, row in rows.items():
        label = name.split(": ", 1)[1]
        ratio = row.get("vs_cubiq")
        print(f"{name:32s} +{row['added_ms']['median']:8.1f} ms  = {row['overhead_pct']:+6.2f} % "
              f"[{row['overhead_pct_q1']:+.2f}, {row['overhead_pct_q3']:+.2f}]   FLOP floor {floors[label]:+.3f} %"
              + (f"   vs cubiq {ratio['median']:.2f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]" if ratio else ""))
    harness.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
