"""Which CLIP vision does this IP-Adapter file need?

    python -m ipadapter_core.inspect FILE [FILE ...]

Prints one JSON line per file: file, variant, base, tokens, encoder, encoder_output, faceid_lora
(and clip_encoder for FaceID-Plus, which also encodes the face crop with CLIP). A file that cannot
be read gets a line with "error" instead, and the exit status is 1.
"""
from __future__ import annotations

import json
import sys

from .loader import AdapterFileError, load_adapter
from .variants import ENCODERS


def describe(path: str) -> dict:
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    lines = [describe(path) for path in argv]
    for line in lines:
        print(json.dumps(line))
    return 1 if any("error" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
