"""The forms of the image attention on the CPU, on the layer shapes of SD1.5 (512 px) and SDXL (1024 px):
each of ``attention_forms.FORMS``, and which one ``attention_plan`` picks on the CPU.

    .venv/bin/python -m bench.attention_forms --out bench/results/attention_forms.json

Each case is one call of our attn2 replacement with adapters of one token count (its text attention
replaced by a ready tensor, the same in both forms); CPU time, interleaved rounds, median.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import harness
from bench.patch_cost import interleave
from ipadapter_core import adapter_spec, attention, attention_forms

# (model, query tokens N, width C, heads H): every distinct cross-attention shape at the model's usual size
SHAPES = (("SD1.5 512", 4096, 320, 8), ("SD1.5 512", 1024, 640, 8), ("SD1.5 512", 256, 1280, 8),
          ("SD1.5 512", 64, 1280, 8), ("SDXL 1024", 4096, 640, 10), ("SDXL 1024", 1024, 1280, 20))
CASES = ((4, 1), (4, 4), (6, 1), (16, 1), (16, 4), (32, 1), (64, 1), (257, 1))  # (image tokens T, stacked adapters A)


def layer_call(width: int, heads: int, tokens: int, adapters: int, queries: int, generator):
    """A call of the replacement on one layer: a batch of 2 (uncond, cond) against ``adapters`` random adapters."""
    specs = tuple(adapter_spec.AdapterSpec(torch.randn(1, tokens, 768, generator=generator),
                                           torch.randn(1, tokens, 768, generator=generator),
                                           (torch.randn(width, 768, generator=generator) / 28,),
                                           (torch.randn(width, 768, generator=generator) / 28,), (1.0,))
                  for _ in range(adapters))
    q, text = torch.randn(2, queries, width, generator=generator), torch.randn(2, 77, width, generator=generator)
    text_result = torch.zeros_like(q)  # the image terms accumulate into it: memory already touched, as in a UNet
    patch = attention.DecoupledCrossAttention(lambda q, k, v, heads, **_: text_result,
                                              {("input", 1, 0): 0}, specs, lambda options: (True, False))
    options = {"n_heads": heads, "block": ("input", 1), "block_index": 0, "original_shape": [2, 4, 64, 64]}
    return lambda: patch(q, text, text, options)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chosen = attention.attention_plan
    generator = torch.Generator().manual_seed(0)
    rows = []
    for model, queries, width, heads in SHAPES:
        for tokens, adapters in CASES:
            call = layer_call(width, heads, tokens, adapters, queries, generator)

            def forced(form, call=call):
                plan = attention_forms.AttentionPlan(form, reads_back=True)  # the CPU's plan in each form

                def run():
                    attention.attention_plan = lambda *_: plan
                    call()
                return run
            forms = attention_forms.FORMS if adapters > 1 else attention_forms.FORMS[1:]  # one: extra heads = per adapter
            times = interleave({form.name: forced(form) for form in forms}, args.rounds)
            ms = {form.name: 1e3 * statistics.median(times[form.name]) for form in forms}
            picked = chosen("cpu", tokens, False).form.name
            rows.append({"model": model, "queries": queries, "width": width, "heads": heads, "tokens": tokens,
                         "adapters": adapters, "ms": ms, "picked": picked, "fastest": min(ms, key=ms.get)})
            print(f"{model} N={queries} C={width} H={heads} T={tokens} A={adapters}: "
                  + ", ".join(f"{form} {t:.2f} ms" for form, t in ms.items()) + f"; picked {picked}", flush=True)
    attention.attention_plan = chosen
    harness.write_result(args.out, {"rows": rows, "key_major_below_tokens": attention_forms.KEY_MAJOR_BELOW_TOKENS,
                                    "head_products_max_tokens": attention_forms.HEAD_PRODUCTS_MAX_TOKENS,
                                    "rounds": args.rounds, "machine": harness.machine(),
                                    "command": "python -m bench.attention_forms " + " ".join(argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
