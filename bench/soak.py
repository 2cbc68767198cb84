"""Soak: many prompts, a mix of this pack's graphs, through one headless server; the server's resident
memory after warm-up must stay flat (a leak grows it with every prompt). Memory is compared as the median over
a window of whole cycles of the mix, first after warm-up and last: the edit prompts load a second model, which
lifts the resident size by 2-5 % until the host lets it go, so a single sample may fall on such a rise.

    .venv/bin/python -m bench.soak [--prompts 100] [--out bench/results/soak.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from tools import comfy_host, factory
from tools.run_example import copy_example_images

WARM_UP = 10
WINDOW = 10  # two cycles of the five-prompt mix


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def base_prompt() -> dict:
    """Tiny SD1.5 + IP-Adapter Plus (Advanced) at 64 px, one step."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.ckpt"}},
        "2": {"class_type": "ImagePromptAdapterLoader", "inputs": {"ipadapter_file": "tiny_ip-adapter-plus_sd15.bin"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.pt"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "5": {"class_type": "ImagePromptApplyAdvanced", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "image": ["4", 0], "clip_vision": ["3", 0], "weight": 1.0,
            "weight_type": "linear", "start_at": 0.0, "end_at": 1.0, "combine_embeds": "concat",
            "embeds_scaling": "V only", "composition_weight": 1.0, "unfold_batch": False, "layer_weights": ""}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "soak"}},
    }


def prompt_mix(i: int) -> dict:
    """Prompt i of the mix: Apply Embeds, the same with another weight type and scaling, two regions, an edit,
    plain text-to-image; the weight or seed changes every time so the patching nodes run again (not from the
    host's cache). Every prompt holds the same Encode node, so the host encodes the reference once (the CLIP
    vision encoder is full size: encoding each prompt would take most of the soak's time); the regions encode
    their images every time."""
    prompt = copy.deepcopy(base_prompt())
    kind = i % 5
    prompt["9"]["inputs"]["seed"] = i
    prompt["12"] = {"class_type": "ImagePromptEncode", "inputs": {
        "ipadapter": ["2", 0], "image": ["4", 0], "weight": 1.0, "crop_position": "pad",
        "interpolation": "bicubic", "sharpening": 0.1, "clip_vision": ["3", 0]}}
    if kind in (0, 1, 3):
        prompt["5"] = {"class_type": "ImagePromptApplyEmbeds", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "pos_embeds": ["12", 0], "neg_embeds": ["12", 1],
            "weight": 0.5 + i / 1000, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "V only", "unfold_batch": False}}
    if kind == 1:
        prompt["5"]["inputs"].update(weight_type="ease out", embeds_scaling="K+V")
    elif kind == 2:
        prompt["13"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        prompt["14"] = {"class_type": "InvertMask", "inputs": {"mask": ["13", 0]}}
        for node, mask, weight in (("15", "13", 0.7), ("16", "14", 0.4 + i / 1000)):
            prompt[node] = {"class_type": "ImagePromptRegion", "inputs": {
                "image": ["4", 0], "image_weight": weight, "prompt_weight": 1.0, "weight_type": "linear",
                "start_at": 0.0, "end_at": 1.0, "mask": [mask, 0]}}
        prompt["17"] = {"class_type": "ImagePromptCombineRegions", "inputs": {"params_1": ["15", 0],
                                                                              "params_2": ["16", 0]}}
        prompt["5"] = {"class_type": "ImagePromptApplyRegions", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "ipadapter_params": ["17", 0], "combine_embeds": "concat",
            "embeds_scaling": "V only", "clip_vision": ["3", 0]}}
    elif kind == 3:
        prompt["18"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15_ip2p.ckpt"}}
        prompt["5"]["inputs"]["model"] = ["18", 0]
        prompt["9"] = {"class_type": "InstructEditSampler", "inputs": {
            "model": ["5", 0], "seed": i, "steps": 1, "text_scale": 5.0, "image_scale": 1.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "vae": ["1", 2], "image": ["4", 0],
            "denoise": 1.0}}
    elif kind == 4:
        prompt["9"]["inputs"]["model"] = ["1", 0]
    return prompt


def run_soak(server: comfy_host.HostServer, prompts: int) -> dict:
    """Run ``prompts`` prompts of the mix (at least WARM_UP + 2 WINDOW); the server's resident memory after
    each, and its median over the first WINDOW prompts after warm-up and over the last WINDOW."""
    if prompts < WARM_UP + 2 * WINDOW:
        raise ValueError(f"prompts: {prompts}; the soak needs at least {WARM_UP + 2 * WINDOW}")
    started = time.monotonic()
    samples = []
    for i in range(prompts):
        server.run_prompt(prompt_mix(i))
        samples.append(rss_mb(server.process.pid))
    warm, last = statistics.median(samples[WARM_UP:WARM_UP + WINDOW]), statistics.median(samples[-WINDOW:])
    return dict(prompts=prompts, warm_up=WARM_UP, window=WINDOW, rss_after_warm_up_mb=round(warm, 1),
                rss_end_mb=round(last, 1), rss_peak_mb=round(max(samples[WARM_UP:]), 1),
                growth=round(last / warm - 1, 4), seconds=round(time.monotonic() - started, 1),
                rss_mb=[round(x) for x in samples])


def serve(base: Path) -> comfy_host.HostServer:
    server = comfy_host.HostServer(base, models_dir=factory.ensure(*factory.LIGHT_SET))
    copy_example_images(server.base_dir / "input")
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as server:
        result = run_soak(server, args.prompts)
    result["machine"] = "2-core CPU, 24 GB (CI class)"
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
