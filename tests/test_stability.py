"""No leaks, determinism and a soak: a patched run never changes a plain model's output, memory held by
adapters is released, the same workflow gives the same bytes from two fresh servers, and resident memory
stays flat over many prompts."""
from __future__ import annotations

import gc
import json
import time
import urllib.request

import pytest
import torch

from bench.soak import base_prompt, prompt_mix, run_soak, serve
from support.nodes import run_node

FILES = ("checkpoints/tiny_sd15.ckpt", "ipadapter/tiny_ip-adapter-plus_sd15.bin",
         "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt")


def plain_prompt() -> dict:
    prompt = base_prompt()
    prompt["9"]["inputs"]["model"] = ["1", 0]
    return prompt


def png_bytes(server, prompt) -> list[bytes]:
    return [path.read_bytes() for path in server.output_files(server.run_prompt(prompt))]


@pytest.mark.server
def test_plain_model_output_is_bit_identical_before_and_after_patched_runs(server):
    before = png_bytes(server, plain_prompt())
    for i in range(3):
        patched = base_prompt()
        patched["5"]["inputs"]["weight"] = 0.6 + i / 10
        assert png_bytes(server, patched) != before
    free = urllib.request.Request(server.url + "/free", data=json.dumps({"free_memory": True}).encode(),
                                  headers={"Content-Type": "application/json"})
    urllib.request.urlopen(free, timeout=30).close()  # the host drops its cache: the plain graph runs again
    time.sleep(2)  # the flag wakes the idle worker, which resets its cache before it takes the next prompt
    assert png_bytes(server, plain_prompt()) == before


@pytest.mark.host
def test_adapter_memory_is_released_once_the_patched_model_is_gone(host, need_models):
    need_models(*FILES)
    pack_module = __import__("tools.comfy_host", fromlist=["pack_module"]).pack_module
    kinds = (pack_module("ipadapter_core.adapter_spec").AdapterSpec,
             pack_module("ipadapter_core.attention").DecoupledCrossAttention)

    def alive():
        gc.collect()
        return sum(isinstance(o, kinds) for o in gc.get_objects())
    baseline = alive()
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter-plus_sd15.bin")
    (patched,) = run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=clip_vision,
                          image=torch.rand(1, 64, 64, 3), weight=1.0)
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
    patched.model.diffusion_model(torch.randn(2, 4, 8, 8), timesteps=torch.tensor([500.0, 500.0]),
                                  context=torch.randn(2, 77, 768), transformer_options=options)
    assert alive() >= baseline + 2  # the spec (with its K/V cache) and the patch
    del patched, options
    assert alive() == baseline


@pytest.mark.server
def test_same_workflow_gives_identical_png_bytes_from_two_fresh_servers(tmp_path, need_models):
    from tools import factory
    need_models(*factory.LIGHT_SET)
    outputs = []
    for run in ("first", "second"):
        with serve(tmp_path / run) as server:
            outputs.append(png_bytes(server, prompt_mix(1)) + png_bytes(server, prompt_mix(2)))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


@pytest.mark.server
@pytest.mark.soak
def test_soak_hundred_prompts_keep_resident_memory_flat(tmp_path, need_models):
    from tools import factory
    need_models(*factory.LIGHT_SET, "checkpoints/tiny_sd15_ip2p.ckpt")
    with serve(tmp_path / "soak") as server:
        result = run_soak(server, 100)
    assert result["growth"] < 0.05, result
