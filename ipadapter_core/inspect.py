"""Which CLIP vision does this IP-Adapter file need, and what does a models folder hold?

    python -m ipadapter_core.inspect FILE [FILE ...]
    python -m ipadapter_core.inspect --models DIR

For files: one JSON line per file: file, variant, base, tokens, encoder, encoder_output, faceid_lora (and
clip_encoder for FaceID-Plus, which also encodes the face crop with CLIP). A file that cannot be read gets a line
with "error" instead, and the exit status is 1.

For a models folder: one line per file of its IP-Adapter folders (ipadapter, xlabs/ipadapters, ipadapter-flux) and
its clip_vision folder, saying what the file is (read from its weights, whatever its name) and which presets of the
unified loaders it satisfies on which base; an adapter whose encoder is not in the folder says so.
"""
from __future__ import annotations

import json
import os
import sys

from .loader import AdapterFileError, load_adapter
from .model_files import ADAPTER_FOLDERS, BASE_NAMES, Found, describe, may_be, recognise
from .presets import PUBLISHED
from .variants import ENCODERS, VARIANTS, layout_mates

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")  # the host's


def describe_file(path: str) -> dict:
    try:
        adapter = load_adapter(path)
    except AdapterFileError as err:
        return {"file": path, "error": str(err)}
    v = adapter.variant
    line = {"file": path, "variant": v.name, "base": v.base, "tokens": v.tokens, "encoder": v.encoder,
            "encoder_output": v.encoder_output, "faceid_lora": v.faceid_lora}
    if v.encoder in ENCODERS:
        line["encoder_file"] = ENCODERS[v.encoder]["file"]
    if v.clip_encoder:
        line["clip_encoder"] = v.clip_encoder
    return line


def model_files(models: str, folder: str) -> list[str]:
    """The model files under ``models/folder``, relative to ``models``, sorted."""
    root = os.path.join(models, folder)
    return sorted(os.path.relpath(os.path.join(top, name), models) for top, _, names in os.walk(root, followlinks=True)
                  for name in names if name.lower().endswith(MODEL_EXTENSIONS))


def adapter_presets(found: Found, encoders: set[str]) -> list[str]:
    """"PLUS on SD1.5" for each preset the adapter file may be the file of (and the encoder it lacks)."""
    presets = []
    for variant in layout_mates(found.adapter.variant):
        preset = PUBLISHED[variant.name].preset
        if preset and may_be(found, variant):
            missing = [e for e in (variant.encoder, variant.clip_encoder) if e in ENCODERS and e not in encoders]
            presets.append(f"{preset} on {BASE_NAMES[variant.base]}" +
                           (f" (no {', '.join(missing)} in clip_vision)" if missing else ""))
    return presets


def encoder_presets(encoder: str) -> list[str]:
    """"PLUS on SD1.5, SDXL" for each preset whose adapter reads ``encoder``."""
    bases: dict[str, list[str]] = {}
    for v in VARIANTS:
        if PUBLISHED[v.name].preset and encoder in (v.encoder, v.clip_encoder):
            bases.setdefault(PUBLISHED[v.name].preset, []).append(BASE_NAMES[v.base])
    return [f"{preset} on {', '.join(names)}" for preset, names in bases.items()]


def models_report(models: str) -> list[str]:
    encoders = {rel: recognise(os.path.join(models, rel), "clip_vision") for rel in model_files(models, "clip_vision")}
    held = {found.encoder for found in encoders.values() if found.encoder}
    lines = []
    for rel in (rel for folder in ADAPTER_FOLDERS for rel in model_files(models, folder)):
        found = recognise(os.path.join(models, rel), "ipadapter")
        presets = adapter_presets(found, held) if found.adapter else []
        layers = f" ({len(found.adapter.layer_widths)} layers)" if found.adapter else ""
        why_not = found.adapter and PUBLISHED[found.adapter.variant.name].why_not
        lines.append(f"{rel}: {describe(found)}{layers} -> {'; '.join(presets) or why_not or 'no preset'}")
    for rel, found in encoders.items():
        presets = encoder_presets(found.encoder) if found.encoder else []
        lines.append(f"{rel}: {describe(found)} -> {'; '.join(presets) or 'no preset'}")
    return lines or [f"{models}: no model files in {', '.join(ADAPTER_FOLDERS)} or clip_vision"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--models":
        if len(argv) != 2 or not os.path.isdir(argv[1]):
            print(f"--models: expected one models folder, got {' '.join(argv[1:]) or 'none'}", file=sys.stderr)
            return 2
        print("\n".join(models_report(argv[1])))
        return 0
    lines = [describe_file(path) for path in argv]
    for line in lines:
        print(json.dumps(line))
    return 1 if any("error" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
