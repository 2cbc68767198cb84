"""The node reference page, docs/nodes.md, written from a live host's ``GET /object_info`` so that it stays true.

    python -m tools.node_reference           # rewrite docs/nodes.md
    python -m tools.node_reference --print   # print the page instead

Each of the pack's nodes: its display name and id, its description, every input in the host's order
(type, default and range or choices, tooltip) and its outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ipadapter_core.migrate import MigrationTable

from . import comfy_host

NODES_PAGE = comfy_host.REPO_ROOT / "docs" / "nodes.md"
PAGE_HEAD = """# Node reference

Part of [comfyui-ipadapter-edit](../README.md). Written by `python -m tools.node_reference` from a live host's
`/object_info` (edits by hand are overwritten): every node of the pack with its inputs, in the host's order, and
its outputs. The node ids of ComfyUI_IPAdapter_plus that the pack also runs have that pack's inputs: see
[that pack's node ids](migration.md#without-migrating-that-packs-node-ids).
"""
MAX_LISTED_CHOICES = 8


def pack_nodes(object_info: dict) -> list[dict]:
    """This pack's node definitions (not ComfyUI_IPAdapter_plus's ids), grouped by category in the order the host
    lists them."""
    theirs = MigrationTable.load().nodes
    ours = [info for info in object_info.values()
            if info["python_module"] == f"custom_nodes.{comfy_host.PACK_DIR_NAME}" and info["name"] not in theirs]
    categories = list(dict.fromkeys(info["category"] for info in ours))
    return sorted(ours, key=lambda info: categories.index(info["category"]))


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def input_kind(spec: list) -> str:
    """An input's type with its default and range, or its choices."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if "default" not in options:
            return "a file name from the list"
        if len(choices) <= MAX_LISTED_CHOICES:
            return "one of " + ", ".join(f"`{c}`" for c in choices) + f" (default `{options['default']}`)"
        return f"one of {len(choices)} choices (default `{options['default']}`)"
    if kind in ("INT", "FLOAT"):
        span = f", {options['min']} to {options['max']}" if "min" in options and "max" in options else ""
        return f"{kind}, default {options.get('default')}{span}"
    if kind in ("BOOLEAN", "STRING") and "default" in options:
        return f"{kind}, default `{options['default']}`" if options["default"] != "" else f"{kind}, default empty"
    return f"`{kind}`"


def node_section(info: dict) -> str:
    lines = [f"## {info['display_name'] or info['name']} (`{info['name']}`)", "", _cell(info.get("description", "")), "",
             "| input | type | what it does |", "|---|---|---|"]
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            tooltip = spec[1].get("tooltip", "") if len(spec) > 1 else ""
            label = f"`{name}`" + (" (optional)" if section == "optional" else "")
            lines.append(f"| {label} | {_cell(input_kind(spec))} | {_cell(tooltip)} |")
    outputs = ", ".join(f"`{name}` ({kind})" for name, kind in zip(info["output_name"], info["output"]))
    lines += ["", f"Outputs: {outputs or 'none (an output node)'}.", ""]
    return "\n".join(lines)


def page(object_info: dict) -> str:
    return "\n".join([PAGE_HEAD, *(node_section(info) for info in pack_nodes(object_info))])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the page instead of writing docs/nodes.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="node-reference-") as base, comfy_host.HostServer(Path(base)) as server:
        text = page(server.get_json("/object_info"))
    if args.print:
        print(text, end="")
    else:
        NODES_PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
