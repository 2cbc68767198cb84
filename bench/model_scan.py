"""How long a unified loader's scan of a models folder takes: a folder of 50 model files (45 IP-Adapters in every
public layout at full depth, 5 CLIP vision encoders; safetensors whose data is a hole on disk, so only the headers are
real), scanned once (every header read) and again (every file remembered by path, size and modification time).

    .venv/bin/python -m bench.model_scan [--files 50]
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import tempfile
import time
from pathlib import Path

from ipadapter_core import model_files
from ipadapter_core.presets import PUBLISHED
from tools.factory import dit_models, ipadapters


def write_header_only(path: Path, shapes: dict, cut: int = 0) -> Path:
    """A float16 safetensors file of these shapes whose data is a hole (``cut`` bytes short: a truncated download)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset - cut)
    return path


def layouts() -> list[dict]:
    """Key -> shape of each public adapter layout (h94's, Kolors', XLabs', InstantX's) and of the CLIP-L/SigLIP
    encoders' first keys (enough for recognition)."""
    found = []
    for v in ipadapters.VARIANTS:
        found.append({f"image_proj.{k}": s for k, s in ipadapters.image_proj_shapes(v).items()} |
                     {f"{v.attn_group}.{k}": s for k, s in ipadapters.ip_adapter_shapes(v).items()})
    found.append({k: tuple(t.shape) for k, t in dit_models.xlabs_adapter("flux-ip-adapter", 1, blocks=19).items()})
    for groups in (dit_models.instantx_flux_adapter(1, blocks=57), dit_models.instantx_sd35_adapter(1, blocks=38)):
        found.append({f"{g}.{k}": tuple(t.shape) for g, tensors in groups.items() for k, t in tensors.items()})
    return found


def encoder(hidden: int, positions: int, projection: int | None, layers: int) -> dict:
    shapes = {"vision_model.embeddings.patch_embedding.weight": (hidden, 3, 14, 14),
              "vision_model.embeddings.position_embedding.weight": (positions, hidden)}
    shapes |= {f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (4 * hidden, hidden) for i in range(layers)}
    return shapes | ({"visual_projection.weight": (projection, hidden)} if projection else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50)
    args = parser.parse_args(argv)
    adapters = layouts()
    encoders = [encoder(1280, 257, 1024, 32), encoder(1664, 257, 1280, 48), encoder(1024, 577, 768, 24),
                encoder(1024, 257, 768, 24), encoder(1152, 729, None, 27)]
    with tempfile.TemporaryDirectory(prefix="model-scan-") as folder:
        paths = []
        for i in range(args.files - len(encoders)):
            paths.append((Path(folder) / f"adapter_{i:02d}.safetensors", "ipadapter"))
            write_header_only(paths[-1][0], adapters[i % len(adapters)])
        for i, shapes in enumerate(encoders):
            paths.append((Path(folder) / f"encoder_{i}.safetensors", "clip_vision"))
            write_header_only(paths[-1][0], shapes)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            found = [model_files.recognise(str(path), kind) for path, kind in paths]
            times.append(time.perf_counter() - start)
    unknown = [f.path for f in found if f.error]
    assert not unknown, unknown
    print(f"{len(paths)} files ({len(paths) - len(encoders)} adapters of {len(adapters)} layouts, {len(encoders)} "
          f"encoders): first scan {times[0] * 1000:.0f} ms (headers read), second {times[1] * 1000:.1f} ms (remembered)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
