"""One layer call of the attn2 replacement in this tree against the same call in another checkout (a refactor's
before and after), on the CPU, interleaved rounds in one process, median ratio.

    git worktree add /tmp/before REV
    .venv/bin/python -m bench.layer_ab --baseline /tmp/before [--rounds 15]

Cases: SD1.5 at 512 px, its widest layer (N 4096, C 320, 8 heads) and its deepest (N 64, C 1280), batch 2
(uncond, cond), with 1 or 4 adapters of 4 or 16 image tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

from bench.patch_cost import interleave

SHAPES = ((4096, 320, 8), (64, 1280, 8))
CASES = ((4, 1), (16, 1), (16, 4))
REPEAT = 10  # calls per timed sweep


def load_core(tree: Path, name: str):
    """``tree``/ipadapter_core imported as the package ``name`` (its relative imports resolve inside it)."""
    init = tree / "ipadapter_core" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def layer_call(core, spec_class, width: int, heads: int, tokens: int, adapters: int, queries: int, seed: int):
    """A call of ``core``'s replacement on one layer, with random adapters from ``seed`` (the same in both trees)."""
    generator = torch.Generator().manual_seed(seed)
    specs = tuple(spec_class(torch.randn(1, tokens, 768, generator=generator),
                             torch.randn(1, tokens, 768, generator=generator),
                             (torch.randn(width, 768, generator=generator) / 28,),
                             (torch.randn(width, 768, generator=generator) / 28,), (1.0,))
                  for _ in range(adapters))
    q, text = torch.randn(2, queries, width, generator=generator), torch.randn(2, 77, width, generator=generator)
    text_result = torch.zeros_like(q)
    patch = core.DecoupledCrossAttention(lambda q, k, v, heads, **_: text_result, {("input", 1, 0): 0}, specs,
                                         lambda options: (True, False))
    side = int(queries ** 0.5)
    options = {"n_heads": heads, "block": ("input", 1), "block_index": 0, "original_shape": [2, 4, side, side]}
    return lambda: patch(q, text, text, options)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    here = Path(__file__).resolve().parents[1]
    trees = {"baseline": load_core(args.baseline.resolve(), "baseline_core"), "this tree": load_core(here, "this_core")}
    for queries, width, heads in SHAPES:
        for tokens, adapters in CASES:
            calls = {}
            for label, package in trees.items():
                core = importlib.import_module(f"{package.__name__}.attention")
                calls[label] = layer_call(core, core.AdapterSpec, width, heads, tokens, adapters, queries, seed=0)
            outputs = {label: call() for label, call in calls.items()}
            assert torch.equal(outputs["baseline"], outputs["this tree"]) or torch.allclose(
                outputs["baseline"], outputs["this tree"], atol=1e-5), "the trees compute different results"
            times = interleave({label: lambda call=call: [call() for _ in range(REPEAT)] for label, call in calls.items()},
                               args.rounds)
            ms = {label: 1e3 * statistics.median(times[label]) / REPEAT for label in calls}
            print(f"N={queries} C={width} H={heads} T={tokens} A={adapters}: baseline {ms['baseline']:.3f} ms, "
                  f"this tree {ms['this tree']:.3f} ms, ratio {ms['this tree'] / ms['baseline']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
