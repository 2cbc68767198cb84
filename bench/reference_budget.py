"""What the reference controls and the Reference Edit Guider cost, on the factory's FLUX.1-dev layout (real widths,
2 double- and 1 single-stream blocks) as FLUX.1 Kontext runs it: a 16 x 16 latent (64 image tokens), one reference
latent of the same size (64 more), 5 text tokens.

Dispatch: operators (each at least one kernel launch on a GPU) and host syncs of one model call, counted with the
torch profiler as in bench.dispatch_budget, with each control over the host's own reference (the bare call).
Guidance: the CPU time of a sampling (Euler, 4 steps) with the Reference Edit Guider at unequal scales over the host's
CFGGuider at the same text scale, interleaved rounds, medians (torch on one thread); and how many model calls each
makes per step.

    .venv/bin/python -m bench.reference_budget [--rounds N] [--device] [--out FILE]
"""
from __future__ import annotations

import sys

import torch

from bench.dispatch_budget import SYNC_OPS, aten_ops
from bench.flux_budget import LATENT_HW, FluxBench, interleaved, start

STEPS = 4


class ReferenceBench:
    """A reference latent on the Flux bench's model, and the controls as the node sets them."""

    def __init__(self, bench: FluxBench):
        from tools import comfy_host
        self.bench = bench
        self.nodes = comfy_host.import_host().NODE_CLASS_MAPPINGS
        g = torch.Generator().manual_seed(2)
        self.reference = torch.randn(1, 16, *LATENT_HW, generator=g)
        self.context, self.pooled = torch.randn(1, 5, 4096, generator=g), torch.randn(1, 768, generator=g)

    def conditioning(self, **controls):
        cond = [[self.context, {"pooled_output": self.pooled, "guidance": 3.5}]]
        (cond,) = self.nodes["ReferenceLatent"].execute(conditioning=cond, latent={"samples": self.reference}).result
        if controls:
            (cond,) = self.nodes["ReferenceLatentControls"].execute(conditioning=cond, reference=1, **controls).result
        return cond

    def call(self, batch: int = 1, **controls):
        """One BaseModel.apply_model call as the sampler makes it for a conditioning with these controls."""
        from comfy.hooks import EnumHookType
        model, device = self.bench.model, self.bench.device
        options = {}
        if controls:
            (hook,) = self.conditioning(**controls)[0][1]["hooks"].get_type(EnumHookType.TransformerOptions)
            options = hook.transformers_dict
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 16, *LATENT_HW, generator=g).to(device)
        context, y = self.context.expand(batch, -1, -1).to(device), self.pooled.expand(batch, -1).to(device)
        guidance, reference = torch.full((batch,), 3.5, device=device), self.reference.to(device)
        sigmas = torch.full((batch,), 0.5, device=device)

        def step():  # a new sigma tensor per call, as each sampler step has
            return model.model.apply_model(x, sigmas.clone(), c_crossattn=context, y=y, guidance=guidance,
                                           ref_latents=[reference.expand(batch, -1, -1, -1)],
                                           transformer_options=dict(options, sigmas=sigmas))
        return step


CONTROLS = {"strength 0.5": dict(strength=0.5, start_at=0.0, end_at=1.0),
            "mask (left half)": dict(strength=1.0, start_at=0.0, end_at=1.0, mask="left"),
            "start/end 0.1-0.9": dict(strength=1.0, start_at=0.1, end_at=0.9),
            "all three": dict(strength=0.5, start_at=0.1, end_at=0.9, mask="left")}


def with_mask(controls: dict) -> dict:
    if controls.get("mask") != "left":
        return controls
    mask = torch.zeros(1, 128, 128)
    mask[..., :64] = 1.0
    return {**controls, "mask": mask}


def dispatch(refs: ReferenceBench, batch: int = 1) -> dict:
    """Operators and syncs each control adds to one model call over the host's own reference."""
    with torch.no_grad():
        bare = aten_ops(refs.call(batch))
        result = {"batch": batch, "blocks": refs.bench.all_blocks, "bare_ops": sum(bare.values()),
                  "bare_syncs": sum(bare[k] for k in SYNC_OPS), "cases": {}}
        for name, controls in CONTROLS.items():
            ops = aten_ops(refs.call(batch, **with_mask(controls)))
            added = sum(ops.values()) - result["bare_ops"]
            result["cases"][name] = {"ops_added": added, "ops_per_block": added / result["blocks"],
                                     "syncs_added": sum(ops[k] for k in SYNC_OPS) - result["bare_syncs"],
                                     "added_by_op": dict((ops - bare).most_common(8))}
    return result


def guidance_cost(refs: ReferenceBench, rounds: int) -> dict:
    """A sampling with the Reference Edit Guider (text 3, image 2) over the host's CFGGuider (3): CPU time and calls."""
    import comfy.samplers
    model = refs.bench.model
    positive, negative = refs.conditioning(), [[torch.zeros(1, 5, 4096), {"pooled_output": refs.pooled}]]

    def guiders(on) -> dict:
        cfg = comfy.samplers.CFGGuider(on)
        cfg.set_conds(positive, negative)
        cfg.set_cfg(3.0)
        (ours,) = refs.nodes["ReferenceEditGuider"].execute(model=on, positive=positive, negative=negative,
                                                            text_scale=3.0, image_scale=2.0).result
        return {"cfg": cfg, "ours": ours}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    latent = torch.zeros(1, 16, *LATENT_HW)

    def sampling(guider):
        return lambda: guider.sample(torch.randn(latent.shape, generator=torch.Generator().manual_seed(3)), latent,
                                     comfy.samplers.sampler_object("euler"), sigmas, seed=3, disable_pbar=True)
    calls, counted = [], model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: calls.append(args["cond_or_uncond"]) or
                                            apply(args["input"], args["timestep"], **args["c"]))
    per_step = {}
    for name, guider in guiders(counted).items():
        calls.clear()
        sampling(guider)()
        per_step[name] = {"model_calls": len(calls) / STEPS, "branches": sum(map(len, calls)) / STEPS}
    with torch.no_grad():
        timed = interleaved({name: sampling(guider) for name, guider in guiders(model).items()}, rounds,
                            refs.bench.device)
    return {"steps": STEPS, "per_step": per_step, **timed}


def main(argv: list[str]) -> int:
    from bench.harness import write_result
    args = start(argv, __doc__)
    refs = ReferenceBench(FluxBench())
    result = {"dispatch": dispatch(refs), "dispatch_batch_2": dispatch(refs, 2), "guidance": guidance_cost(refs, args.rounds)}
    for key in ("dispatch", "dispatch_batch_2"):
        d = result[key]
        print(f"model call with one reference, batch {d['batch']}, {d['blocks']} blocks: bare {d['bare_ops']} ops, "
              f"{d['bare_syncs']} syncs")
        for name, row in d["cases"].items():
            print(f"  {name}: +{row['ops_added']} ops ({row['ops_per_block']:.1f} per block), +{row['syncs_added']} syncs")
    g = result["guidance"]
    print(f"sampling {g['steps']} steps: CFG {g['cfg_ms']:.0f} ms, Reference Edit Guider (3, 2) {g['ours_ms']:.0f} ms: "
          f"x{g['ratio']:.3f} [{g['ratio_range'][0]:.3f}, {g['ratio_range'][1]:.3f}] over {g['rounds']} rounds; "
          f"per step {g['per_step']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
