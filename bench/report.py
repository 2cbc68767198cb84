"""Collect the JSON results in bench/results/ into one markdown table file and one plot.

    .venv/bin/python -m bench.report   # writes bench/results/speed.md and bench/results/speed.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("ours", "cubiq", "diffusers")
NAMES = {"ours": "ours", "cubiq": "ComfyUI_IPAdapter_plus", "diffusers": "diffusers"}


def _read(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(row: dict | None) -> str:
    if row is None:
        return "–"
    r = row["ratio"]
    return f"{(r['median'] - 1) * 100:+.1f} % [{(r['min'] - 1) * 100:+.1f}, {(r['max'] - 1) * 100:+.1f}]"


def overhead_rows(host: dict, diffusers: dict | None) -> tuple[list[str], dict]:
    """Markdown rows (variant | ours | cubiq | diffusers | FLOP floor) and the numbers for the plot."""
    labels = list(host["flop_floor"])
    rows, plotted = [], {}
    for label in labels:
        cells = {impl: (host if impl != "diffusers" else diffusers or {"variants": {}})["variants"].get(f"{impl}: {label}")
                 for impl in IMPLEMENTATIONS}
        floor = (host["flop_floor"][label] - 1) * 100
        rows.append(f"| {label} | " + " | ".join(_ratio(cells[i]) for i in IMPLEMENTATIONS) + f" | {floor:+.2f} % |")
        plotted[label] = {i: (cells[i]["ratio"]["median"] - 1) * 100 for i in IMPLEMENTATIONS if cells[i]}
        plotted[label]["FLOP floor"] = floor
    return rows, plotted


def overhead_section(size: int, sets: list[str]) -> tuple[list[str], dict]:
    lines, plotted = [], {}
    for set_name in sets:
        host = _read(f"step_overhead_{size}_{set_name}.json")
        if host is None:
            continue
        diffusers = _read(f"step_overhead_{size}_{set_name}_diffusers.json")
        bare = host["variants"]["bare"]["seconds"]["median"]
        lines += [f"Bare step {bare:.1f} s (host: {host['attention']}); {host['rounds']} interleaved rounds; "
                  f"{host['machine']}; `{host['command']}`"
                  + (f"; diffusers bare step {diffusers['variants']['bare']['seconds']['median']:.1f} s, "
                     f"`{diffusers['command']}`" if diffusers else ""), "",
                  "| adapters | ours | ComfyUI_IPAdapter_plus | diffusers | FLOP floor |", "|---|---|---|---|---|"]
        rows, numbers = overhead_rows(host, diffusers)
        lines += rows + [""]
        plotted.update(numbers)
    return lines, plotted


def dispatch_section() -> list[str]:
    lines = ["| attention | implementation | adapters | patched layers | operators added per layer per adapter "
             "| host syncs added per step |", "|---|---|---|---|---|---|"]
    commands = []
    for name, attention in (("sdpa", "SDPA"), ("subquad", "host CPU default (sub-quadratic)")):
        results = _read(f"dispatch_budget_sd15_{name}.json")
        if not results:
            continue
        commands.append(f"`python -m bench.dispatch_budget --full{' --pytorch-attention' if name == 'sdpa' else ''} "
                        f"--cubiq /tmp/cubiq_pack`")
        for result in results:
            for row in result["stacks"]:
                lines.append(f"| {attention} | {NAMES[result['implementation']]} | {row['adapters']} | {result['layers']} "
                             f"| {row['ops_per_layer_per_adapter']:.2f} | {row['syncs_added']} |")
    return lines + ["", "Reproduce: " + ", ".join(commands), ""]


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


def plot(plotted: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(plotted)
    series = ["ours", "cubiq", "diffusers", "FLOP floor"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [plotted[label].get(name, float("nan")) for label in labels]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=NAMES.get(name, name))
    ax.set_xticks([x + 1.5 * width for x in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel("added per UNet step, % of the bare step")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("IP-Adapter overhead, full SD1.5 UNet, 2-core CPU (median of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    lines = ["# Speed results", "", "Generated by `python -m bench.report` from the JSON files beside it. Overheads are"
             " the UNet step's time with the adapter over the bare step in the same round, median [min, max] over"
             " rounds. CPU timings: a 2-core CPU shared with other jobs, torch on 1 thread.", ""]
    plotted = {}
    for size in (256, 512):
        section, numbers = overhead_section(size, ["types", "stacks", "types-512"])
        if section:
            lines += [f"## Per-step overhead, {size} px", ""] + section
            plotted.update({f"{label} {size}px": v for label, v in numbers.items()})
    lines += ["## Dispatch budget (torch profiler, full SD1.5 UNet, one batch-2 call)", ""] + dispatch_section()
    lines += ["## Instruction edit guider", ""] + edit_section()
    lines += ["## Adapter load and CLIP-vision encode", ""] + load_section()
    (RESULTS / "speed.md").write_text("\n".join(lines))
    if plotted:
        plot(plotted, RESULTS / "speed.png")
    print(RESULTS / "speed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
