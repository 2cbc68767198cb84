"""Collect the JSON results in bench/results/ into one markdown table file and one plot.

    .venv/bin/python -m bench.report   # writes bench/results/speed.md and bench/results/speed.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import device

RESULTS = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("ours", "cubiq", "diffusers")
NAMES = {"ours": "ours", "cubiq": "ComfyUI_IPAdapter_plus", "diffusers": "diffusers"}


def _read(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(row: dict | None, key: str = "ratio") -> str:
    if row is None:
        return "–"
    r = row[key]
    return f"{(r['median'] - 1) * 100:+.1f} % [{(r['min'] - 1) * 100:+.1f}, {(r['max'] - 1) * 100:+.1f}]"


def patch_cost_section(size: int, suffix: str = "") -> tuple[list[str], dict]:
    """Per-step overhead from the patch cost on the real layer shapes (bench.patch_cost), with ours over
    ComfyUI_IPAdapter_plus round by round (median [quartiles]) where the run has both."""
    result = _read(f"patch_cost_{size}{suffix}.json")
    if result is None:
        return [], {}
    runs = [result] + [r for r in [_read(f"patch_cost_{size}{suffix}_diffusers.json")] if r]
    for extra in runs[1:]:  # diffusers measured in a run of its own (over its own bare step)
        result = dict(result, variants={**result["variants"], **extra["variants"]})
    lines = [f"Bare UNet step {run['bare_step_cpu_s']:.2f} s CPU (batch 2, latent {size // 8}²); {run['rounds']} "
             f"interleaved rounds; {run['machine']}; `{run['command']}`" for run in runs]
    lines = ["; ".join(lines), "",
             "| adapters | ours | ComfyUI_IPAdapter_plus | ours / theirs | diffusers | FLOP floor |",
             "|---|---|---|---|---|---|"]
    plotted = {}
    for label, floor in result["flop_floor_pct"].items():
        cells, plotted[label] = [], {"FLOP floor": floor}
        for impl in IMPLEMENTATIONS:
            row = result["variants"].get(f"{impl}: {label}")
            if row is None:
                cells += ["–", "–"] if impl == "cubiq" else ["–"]
                continue
            cells.append(f"{row['overhead_pct']:+.2f} % ({row['added_ms']['median']:.0f} ms)")
            plotted[label][impl] = row["overhead_pct"]
            if impl == "cubiq":
                ratio = result["variants"][f"ours: {label}"].get("vs_cubiq")
                cells.append("–" if ratio is None else f"{ratio['median']:.2f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {floor:+.3f} % |")
    return lines + [""], plotted


def end_to_end_section(size: int, set_name: str) -> list[str]:
    host = _read(f"step_overhead_{size}_{set_name}.json")
    if host is None:
        return []
    bare = host["variants"]["bare"]
    lines = [f"Bare step {bare['seconds']['median']:.1f} s CPU, {bare['wall_seconds']['median']:.0f} s wall (host: "
             f"{host['attention']}); {host['rounds']} interleaved rounds; {host['machine']}; `{host['command']}`", "",
             "| variant | CPU time vs bare | wall time vs bare | FLOP floor |", "|---|---|---|---|"]
    for name, row in host["variants"].items():
        if name == "bare":
            continue
        floor = host["flop_floor"].get(name.split(": ", 1)[1])
        lines.append(f"| {name} | {_ratio(row)} | {_ratio(row, 'wall_ratio')} | "
                     f"{'–' if floor is None else f'{(floor - 1) * 100:+.2f} %'} |")
    return lines + [""]


def dispatch_section() -> list[str]:
    lines = ["| attention | implementation | adapters | patched layers | operators added per layer per adapter "
             "| operators added vs one adapter | host syncs added per step |", "|---|---|---|---|---|---|---|"]
    commands = []
    for name, attention in (("sdpa", "SDPA"), ("subquad", "host CPU default (sub-quadratic)")):
        results = _read(f"dispatch_budget_sd15_{name}.json")
        if not results:
            continue
        commands.append(f"`python -m bench.dispatch_budget --full{' --pytorch-attention' if name == 'sdpa' else ''} "
                        f"--cubiq /tmp/cubiq_pack`")
        for result in results:
            one = result["stacks"][0]["ops_added"]
            for row in result["stacks"]:
                lines.append(f"| {attention} | {NAMES[result['implementation']]} | {row['adapters']} | {result['layers']} "
                             f"| {row['ops_per_layer_per_adapter']:.2f} | ×{row['ops_added'] / one:.2f} "
                             f"| {row['syncs_added']} |")
    return lines + ["", "Reproduce: " + ", ".join(commands), ""]


def forms_section() -> list[str]:
    """The image attention's forms on the CPU, one layer call each (bench.attention_forms)."""
    result = _read("attention_forms.json")
    if result is None:
        return []
    forms = list(max((row["ms"] for row in result["rows"]), key=len))  # the module's order (FORMS)
    lines = [f"One call of the attn2 replacement per row (batch 2), its text attention left out; {result['rounds']} "
             f"interleaved rounds, median; {result['machine']}; `{result['command']}`. In bold: the form the CPU "
             f"runs (`attention_plan`); GPUs run extra heads.", "",
             "| layer | image tokens × adapters | " + " | ".join(forms) + " |", "|---|---|" + "---|" * len(forms)]
    for row in result["rows"]:
        cells = [("–" if form not in row["ms"] else
                  (f"**{row['ms'][form]:.2f} ms**" if form == row["picked"] else f"{row['ms'][form]:.2f} ms"))
                 for form in forms]
        lines.append(f"| {row['model']}: N={row['queries']}, C={row['width']}, H={row['heads']} "
                     f"| {row['tokens']} × {row['adapters']} | " + " | ".join(cells) + " |")
    return lines + [""]


def edit_section() -> list[str]:
    lines = []
    for unet in ("tiny", "full"):
        result = _read(f"edit_guider_{unet}.json")
        if result is None:
            continue
        lines += [f"{unet} edit UNet, {result['size']} px, {result['rounds']} rounds, {result['machine']}; "
                  f"`{result['command']}`", "", "| guider | step | vs DualCFGGuider |", "|---|---|---|"]
        for name, row in result["variants"].items():
            r = row["ratio"]
            lines.append(f"| {name} | {row['seconds']['median']:.3f} s | ×{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] |")
        lines.append("")
    return lines


def _percent_added(value: float, bare: float) -> str:
    return f"{100 * (value / bare - 1):+.2f} %" if bare else "–"


def gpu_step_lines(result: dict) -> list[str]:
    """Whole sampler steps on a GPU (bench.gpu_step): wall, kernels, host syncs and GPU busy time per step."""
    variants = result["variants"]
    bare = variants["bare"]
    lines = [f"{result['model']} {result['size']} px, {result['device']}, {result['dtype']}, {result['rounds']} rounds "
             f"of {result['steps']} steps; `{result['command']}`. Bare step: {bare['wall_ms']['median']:.1f} ms wall, "
             f"{bare['kernels']:.0f} kernels, {bare['syncs']:.0f} host syncs, GPU busy {bare['gpu_busy_ms']:.2f} ms.",
             "", "| variant | wall ms/step [quartiles] | wall added | ours / theirs (wall added) | kernels added "
             "per patched layer per adapter | host syncs added | GPU busy added |", "|---|---|---|---|---|---|---|"]
    for name, row in variants.items():
        if name == "bare":
            continue
        implementation, label = name.split(": ", 1)
        theirs = variants.get(f"cubiq: {label}")
        ratio = (f"{row['wall_added_pct'] / theirs['wall_added_pct']:.2f}"
                 if implementation == "ours" and theirs and theirs["wall_added_pct"] > 0 else "–")
        w = row["wall_ms"]
        lines.append(f"| {NAMES[implementation]}: {label} | {w['median']:.1f} [{w['q1']:.1f}, {w['q3']:.1f}] "
                     f"| {row['wall_added_pct']:+.1f} % | {ratio} "
                     f"| {(row['kernels'] - bare['kernels']) / row['patched_layers'] / row['adapters']:.2f} "
                     f"({row['patched_layers']} layers) | {row['syncs'] - bare['syncs']:+.0f} "
                     f"| {_percent_added(row['gpu_busy_ms'], bare['gpu_busy_ms'])} |")
    return lines + [""]


def edit_device_lines(result: dict) -> list[str]:
    """The edit guiders on a GPU (bench.edit_guider --device): wall, kernels and GPU busy time per step."""
    lines = [f"Instruction edit, {result['unet']} SD1.5 edit UNet, {result['size']} px, {result['machine']}, "
             f"{result['dtype']}, {result['rounds']} rounds; `{result['command']}`", "",
             "| guider | wall ms/step | vs DualCFGGuider (wall) | kernels per step | host syncs per step "
             "| GPU busy ms per step |", "|---|---|---|---|---|---|"]
    for name, row in result["variants"].items():
        r = row["wall_ratio"]
        lines.append(f"| {name} | {row['wall_seconds']['median'] * 1e3:.1f} | ×{r['median']:.3f} [{r['min']:.3f}, "
                     f"{r['max']:.3f}] | {row['kernels']:.0f} | {row['syncs']:.0f} | {row['gpu_busy_ms']:.2f} |")
    return lines + [""]


def gpu_section() -> list[str]:
    """What a device run (bench.device) brought back, in its order."""
    lines = []
    for name, module, *_ in device.RUNS:
        result = _read(name)
        if result is not None:
            lines += (gpu_step_lines if module == "bench.gpu_step" else edit_device_lines)(result)
    return lines


def load_section() -> list[str]:
    result = _read("load_encode.json")
    if result is None:
        return []
    lines = [f"{result['machine']}; `{result['command']}`", "",
             "| file | size | params | first load | median load | peak RSS added |", "|---|---|---|---|---|---|"]
    for row in result["loads"]:
        lines.append(f"| {row['file']} | {row['mb']:.0f} MB | {row['params_m']} M | {row['first_s']:.3f} s "
                     f"| {row['median_s']:.3f} s | {row['peak_added_mb']} MB |")
    e = result["encode"]
    lines += ["", f"CLIP vision {e['encoder']}, batch of {e['batch']}: {e['encode_s']:.1f} s, "
                  f"**{e['images_per_s']:.2f} images/s**; the plus projection of the 16 then takes {e['plus_projection_s']:.3f} s.", ""]
    return lines


def plot(plotted: dict, dispatch: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = list(plotted)
    series = ["ours", "cubiq", "diffusers", "FLOP floor"]
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [plotted[label].get(name, float("nan")) for label in labels]
        left.bar([x + i * width for x in range(len(labels))], values, width, label=NAMES.get(name, name))
    left.set_xticks([x + 1.5 * width for x in range(len(labels))], labels, rotation=25, ha="right")
    left.set_ylabel("added per UNet step, % of the bare step (CPU time)")
    left.axhline(0, color="black", linewidth=0.5)
    left.legend()
    left.set_title("IP-Adapter per-step overhead, full SD1.5 UNet, 2-core CPU")
    short = {"ours": "ours", "cubiq": "IPAdapter_plus"}
    names = [f"{short[r['implementation']]}\n{r['attention_short']}" for r in dispatch]
    right.bar(range(len(dispatch)), [r["stacks"][0]["ops_per_layer_per_adapter"] for r in dispatch],
              color=["C0" if r["implementation"] == "ours" else "C1" for r in dispatch])
    right.set_xticks(range(len(dispatch)), names, fontsize=7, rotation=30, ha="right")
    right.set_ylabel("operators added per layer (1 adapter)")
    right.set_title("Dispatch budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    lines = ["# Speed results", "", "Generated by `python -m bench.report` from the JSON files beside it. CPU timings:"
             " a 2-core CPU shared with other jobs, torch on 1 thread; overheads in CPU time of the benchmark"
             " process (wall time on a shared machine also counts other jobs' time slices).", ""]
    plotted = {}
    for size in (256, 512):
        section, _ = patch_cost_section(size, "_image_only")
        if section:
            lines += [f"## Per-step overhead at {size} px: the image term alone on the 16 layers' shapes "
                      "(`--image-only`), over the bare step", ""] + section
        section, numbers = patch_cost_section(size)
        if section:  # plotted: these runs also have diffusers
            lines += [f"## Per-step overhead at {size} px: patched minus plain attention on the 16 layers' shapes, "
                      "over the bare step", ""] + section
            plotted.update({f"{label}, {size} px": v for label, v in numbers.items()})
    for size, set_name in ((256, "types"), (256, "stacks"), (512, "types-512")):
        section = end_to_end_section(size, set_name)
        if section:
            lines += [f"## Whole steps through the host's sampler, {size} px ({set_name})", ""] + section
    lines += ["## Forms of the image attention on the CPU", ""] + forms_section()
    lines += ["## Dispatch budget (torch profiler, full SD1.5 UNet, one batch-2 call, the GPU's forms)", ""]
    lines += dispatch_section()
    lines += ["## Instruction edit guider", ""] + edit_section()
    gpu = gpu_section()
    if gpu:
        lines += ["## On a GPU: whole sampler steps (bench.gpu_step, bench.edit_guider --device)", ""] + gpu
    lines += ["## Adapter load and CLIP-vision encode", ""] + load_section()
    (RESULTS / "speed.md").write_text("\n".join(lines))
    dispatch = []
    for name, short in (("sdpa", "SDPA"), ("subquad", "sub-quad")):
        for result in _read(f"dispatch_budget_sd15_{name}.json") or []:
            dispatch.append(dict(result, attention_short=short))
    if plotted:
        plot(plotted, dispatch, RESULTS / "speed.png")
    print(RESULTS / "speed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
