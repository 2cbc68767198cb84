"""Dispatch budget and CPU overhead of the SD3.5 image prompt: what InstantX's adapter adds to one step of an MMDiT.

The MMDiT has SD3.5 Large's width (2432, 38 heads) with 2 of its 38 joint blocks: the host's loader ties the block
count to the width, so the bench builds the model through the host's own detection and model class with the block
count set (the pack never does this; its tests use the host's loader at a reduced width). 64 image tokens (a 16 x 16
latent) and 5 text tokens per latent, batch 2 (CFG); the adapter at that width, 729 SigLIP hidden states per image.
Operators (each at least one kernel launch on a GPU) and host syncs are counted with the torch profiler as in
bench.flux_budget, per joint block and adapter; the resampler runs once per step and adapter, so its operators are
shared by the blocks (a model of 38 blocks divides them by 38, not 2). The CPU overhead is measured as in
bench.flux_budget, with the resampler's own time beside it (what a step of the full model pays on top of its blocks).

    .venv/bin/python -m bench.sd35_budget [--rounds N] [--device] [--out FILE]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.dispatch_budget import aten_ops
from bench.flux_budget import dispatch, overhead, seconds, start
from tools import comfy_host, factory
from tools.factory.dit_models import instantx_sd35_adapter

WIDTH, BLOCKS = 2432, 2  # SD3.5 Large's width (64 per head, 38 heads), 2 joint blocks
LATENT_HW = (16, 16)
SIGLIP_TOKENS, SIGLIP_WIDTH = 729, 1152


def sd35_model(width: int = WIDTH, seed: int = 0):
    """The host's SD3 model (its detection, model class and patcher) of ``width`` (SD3.5 Large's by default) with
    BLOCKS joint blocks, random weights."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from tools.factory.pool import WeightPools, meta_shapes
    context = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": width}}
    with torch.device("meta"):
        meta = MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=width // 64, num_blocks=BLOCKS,
                     pos_embed_max_size=16, num_patches=16 * 16, adm_in_channels=2048,
                     context_embedder_config=context, qk_norm="rms", operations=comfy.ops.disable_weight_init)
    state = WeightPools(seed).state_dict(meta_shapes(meta))
    config = comfy.model_detection.model_config_from_unet(state, "")
    config.unet_config["num_blocks"] = BLOCKS
    model = config.get_model(state, "")
    model.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class SD35Bench:
    """The MMDiT in the in-process host, and InstantX's adapter applied to it as Apply IP-Adapter Embeds applies it
    (the attributes bench.flux_budget's dispatch and overhead read). Operator counts do not depend on the width:
    the tests count them at 128."""

    def __init__(self, width: int = WIDTH):
        import comfy.model_management
        comfy_host.import_host(models_dir=factory.models_dir())
        self.width = width
        self.model = sd35_model(width)
        self.device = comfy.model_management.get_torch_device()
        if self.device.type != "cpu":
            comfy.model_management.load_models_gpu([self.model])
        self.encode = comfy_host.pack_module("nodes.ipadapter_encode")
        self.apply = comfy_host.pack_module("nodes.ipadapter_apply")
        self.options = comfy_host.pack_module("ipadapter_core.apply_options").ApplyOptions
        self.double_blocks = self.all_blocks = BLOCKS
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "ip-adapter.bin"
            factory.write_state_dict(instantx_sd35_adapter(1, BLOCKS, width), path)
            self.adapter = self.encode.load(str(path))

    def blocks(self, versions: list[str]) -> int:
        return BLOCKS

    def patched(self, versions: list[str], **inputs):
        """The model with one adapter per entry of ``versions``, random SigLIP hidden states each."""
        model, g = self.model, torch.Generator().manual_seed(0)
        for _ in versions:
            embeds = torch.randn(1, SIGLIP_TOKENS, SIGLIP_WIDTH, generator=g)
            model = self.apply.apply_embeds(model, self.adapter, embeds, None, self.options.from_inputs(1.0, **inputs))
        return model

    def step(self, model, batch: int):
        """One call of the model as the sampler makes it (apply_model with the patcher's wrappers), fixed inputs."""
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 16, *LATENT_HW, generator=g).to(self.device)
        context = torch.randn(batch, 5, 4096, generator=g).to(self.device)
        y = torch.randn(batch, 2048, generator=g).to(self.device)
        sigmas = torch.full((batch,), 0.5, device=self.device)

        def call():  # a new sigma tensor per call, as each sampler step has: per-step work is redone
            step_sigmas = sigmas.clone()
            options = dict(model.model_options["transformer_options"], cond_or_uncond=[1, 0][-batch:],
                           sigmas=step_sigmas, wrappers=model.wrappers)
            return model.model.apply_model(x, step_sigmas, c_crossattn=context, y=y, transformer_options=options)
        return call

    def resampler(self, batch: int = 2):
        """The resampler's per-step call on ``batch`` rows of SigLIP hidden states."""
        rows = torch.randn(batch, SIGLIP_TOKENS, SIGLIP_WIDTH, device=self.device)
        t = torch.full((batch,), 500.0, device=self.device)
        resampler = self.adapter.projection.to(self.device)
        return lambda: resampler(rows, t)

    def resampler_ops(self, batch: int) -> int:
        """Operators of one resampler call at a model ``batch`` of 1 (cond only: one row) or of CFG (the cond and
        uncond rows); once per step and adapter, whatever the number of blocks or latents."""
        with torch.no_grad():
            return sum(aten_ops(self.resampler(1 if batch == 1 else 2)).values())

    def resampler_ms(self, rounds: int, batch: int = 2) -> float:
        """Median time of the resampler's per-step call (batch rows of SigLIP hidden states), in ms."""
        resampler = self.resampler(batch)
        with torch.no_grad():
            resampler()
            times = [seconds(resampler, self.device) for _ in range(rounds)]
        return statistics.median(times) * 1000


def main(argv: list[str]) -> int:
    from bench.harness import write_result
    args = start(argv, __doc__)
    bench = SD35Bench()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    result = {"dispatch": {batch: dispatch(bench, {"sd35": ["sd35"], "sd35 x2": ["sd35", "sd35"]}, batch=batch)
                           for batch in (1, 2)},
              "dispatch_masked_gated": dispatch(bench, {"sd35": ["sd35"]}, attn_mask=mask, start_at=0.1, end_at=0.9),
              "cpu_overhead": overhead(bench, ["sd35"], args.rounds),
              "resampler_ops": {batch: bench.resampler_ops(batch) for batch in (1, 2)},
              "resampler_ms": bench.resampler_ms(args.rounds)}
    for batch, d in result["dispatch"].items():
        resampler = result["resampler_ops"][batch]
        print(f"SD3.5 step, batch {batch}, {BLOCKS} joint blocks {bench.width} wide: bare {d['bare_ops']} kernel-launching "
              f"ops, {d['bare_syncs']} syncs")
        for name, row in d["cases"].items():
            adapters = row["adapters"]
            print(f"  {name}: +{row['ops_added']} ops: {adapters} x {resampler} of the resampler per step, "
                  f"{(row['ops_added'] - adapters * resampler) / BLOCKS:.1f} per joint block; +{row['syncs_added']} "
                  f"syncs")
    (row,) = result["dispatch_masked_gated"]["cases"].values()
    print(f"  masked + start/end (batch 2): +{row['ops_added']} ops, +{row['syncs_added']} syncs")
    o = result["cpu_overhead"]
    print(f"step on {o['device']}: bare {o['bare_ms']:.0f} ms, one adapter {o['patched_ms']:.0f} ms: x{o['ratio']:.3f} "
          f"[{o['ratio_range'][0]:.3f}, {o['ratio_range'][1]:.3f}] over {o['rounds']} rounds; FLOPs "
          f"x{o['flop_ratio']:.4f}; the resampler alone {result['resampler_ms']:.0f} ms per step")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
