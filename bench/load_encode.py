"""Adapter load time and peak memory per file type, and CLIP-vision encode throughput for a batch of 16.

Load: what Load IP-Adapter does (read the file, identify the variant, build the projection model), each
file in a fresh process so its peak RSS is its own. Files are written for the run under the system temp
folder in the real files' layouts and storage (fp16, every tensor stored on its own, as the public files
are; the factory's own .bin files share storage between tensors and would load unrealistically fast),
and removed afterwards. Timed: the first load (file from the page cache, as after a download) and the
median of four more.

Encode: the host's CLIP vision (the factory's ViT-H, full size, fp32) on 16 reference images at once, as
the Apply nodes call it, then the plus adapter's projection on its output.

    .venv/bin/python -m bench.load_encode [--skip-sdxl] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

FILES = ("ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-full-face_sd15", "ip-adapter_sdxl",
         "ip-adapter-plus_sdxl_vit-h")
REPEATS = 5


def write_real_layout(stem: str, folder: Path) -> list[Path]:
    """The layout of ``stem`` as a .bin and a .safetensors with contiguous fp16 tensors."""
    from tools import factory
    from tools.factory.ipadapters import BY_STEM, adapter_state_dict
    groups = {g: {k: v.to(torch.float16).clone(memory_format=torch.contiguous_format) for k, v in sd.items()}
              for g, sd in adapter_state_dict(BY_STEM[stem], seed=1).items()}
    paths = [folder / f"{stem}.bin", folder / f"{stem}.safetensors"]
    for path in paths:
        factory.write_state_dict(groups, path)
    return paths


def load_once(path: str) -> dict:
    """In this process: load ``path`` REPEATS times as the loader node does; times and memory."""
    from ipadapter_core.loader import load_adapter
    from ipadapter_core.projection import build_projection
    with open("/proc/self/statm") as f:
        before_mb = int(f.read().split()[1]) * 4096 / 2**20
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        adapter = load_adapter(path)
        build_projection(adapter.variant, adapter.image_proj)
        seconds.append(time.perf_counter() - start)
    params = sum(t.numel() for group in (adapter.image_proj, adapter.ip_adapter) for t in group.values())
    return {"file": Path(path).name, "mb": round(Path(path).stat().st_size / 2**20, 1), "params_m": round(params / 1e6, 1),
            "first_s": seconds[0], "median_s": sorted(seconds[1:])[len(seconds[1:]) // 2],
            "rss_before_mb": round(before_mb), "peak_rss_mb": round(harness.peak_rss_mb()),
            "peak_added_mb": round(harness.peak_rss_mb() - before_mb)}


def encode_throughput(batch: int = 16) -> dict:
    """The host's CLIP vision ViT-H on ``batch`` images, then the plus projection on the hidden states."""
    harness.start_host()
    import comfy.clip_vision
    from tools import factory
    from tools.comfy_host import pack_module
    name = "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt"
    start = time.perf_counter()
    clip_vision = comfy.clip_vision.load(str(factory.ensure(name) / name))
    load_s = time.perf_counter() - start
    images = torch.rand(batch, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clip_vision.encode_image(images[:1])  # warm-up
        start = time.perf_counter()
        encoded = clip_vision.encode_image(images)
        encode_s = time.perf_counter() - start
        loader, projection = pack_module("ipadapter_core.loader"), pack_module("ipadapter_core.projection")
        file = harness.ADAPTERS["plus"]
        adapter = loader.load_adapter(factory.ensure(file) / file)
        proj = projection.build_projection(adapter.variant, adapter.image_proj)
        start = time.perf_counter()
        proj(encoded.penultimate_hidden_states.float())
        project_s = time.perf_counter() - start
    return {"encoder": "ViT-H-14 (632 M, fp32)", "batch": batch, "load_s": load_s, "encode_s": encode_s,
            "images_per_s": batch / encode_s, "plus_projection_s": project_s, "peak_rss_mb": round(harness.peak_rss_mb())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-sdxl", action="store_true", help="only the SD1.5 files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see bench.step_overhead)")
    parser.add_argument("--load-one", help=argparse.SUPPRESS)  # internal: one file, in its own process
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.load_one:
        print(json.dumps(load_once(args.load_one)))
        return 0
    started = time.time()
    stems = [s for s in FILES if not (args.skip_sdxl and "sdxl" in s)]
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as folder:
        for stem in stems:
            for path in write_real_layout(stem, Path(folder)):
                done = subprocess.run([sys.executable, "-m", "bench.load_encode", "--load-one", str(path)],
                                      capture_output=True, text=True, check=True, cwd=harness.comfy_host.REPO_ROOT)
                loads.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = loads[-1]
                print(f"{row['file']:40s} {row['mb']:7.1f} MB {row['params_m']:6.1f} M params  first {row['first_s']:.3f} s"
                      f"  median {row['median_s']:.3f} s  peak RSS +{row['peak_added_mb']} MB", flush=True)
                path.unlink()
    encode = encode_throughput()
    print(f"CLIP vision {encode['encoder']}: batch {encode['batch']} in {encode['encode_s']:.1f} s "
          f"({encode['images_per_s']:.2f} images/s); plus projection {encode['plus_projection_s']:.3f} s")
    result = {"loads": loads, "encode": encode, "machine": harness.machine(), "wall_s": round(time.time() - started),
              "command": "python -m bench.load_encode " + " ".join(argv)}
    harness.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
