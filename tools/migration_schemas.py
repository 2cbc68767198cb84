"""Write the node schemas of the migration table from what a headless host serves at /object_info: ``ours``
(this pack's nodes that the table maps to) and, with --cubiq, each rule's ``schema`` (that pack's node as
ComfyUI_IPAdapter_plus, unpacked in DIR, defines it: the compatible node ids are built from it).

    .venv/bin/python -m tools.migration_schemas [--cubiq DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ipadapter_core.migrate import TABLE_PATH, node_schema
from tools import comfy_host

CUBIQ_NODE_DIR = "ComfyUI_IPAdapter_plus"


def served_object_info(cubiq: Path | None) -> dict:
    """/object_info of a headless host with this pack (and that pack from ``cubiq``) loaded."""
    base = Path(tempfile.mkdtemp(prefix="migration-schemas-"))
    if cubiq is not None:
        if not (cubiq / "IPAdapterPlus.py").is_file():
            raise FileNotFoundError(f"--cubiq {cubiq}: not an unpacked ComfyUI_IPAdapter_plus (no IPAdapterPlus.py)")
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / CUBIQ_NODE_DIR).symlink_to(cubiq.resolve(), target_is_directory=True)
    with comfy_host.HostServer(base) as server:
        return server.get_json("/object_info")


def dumps(value, indent: str = "") -> str:
    """JSON with one line per object or list that holds no other (one input spec, one widget's options)."""
    flat = not isinstance(value, (dict, list)) or not any(isinstance(item, (dict, list)) for item in
                                                          (value.values() if isinstance(value, dict) else value))
    if flat:
        return json.dumps(value, ensure_ascii=False)
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(key)}: {dumps(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + dumps(item, inner) for item in value) + f"\n{indent}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cubiq", type=Path, help="an unpacked ComfyUI_IPAdapter_plus folder")
    args = parser.parse_args(argv)
    table = json.loads(TABLE_PATH.read_text())
    info = served_object_info(args.cubiq)
    table["ours"] = {node_id: node_schema(info[node_id]) for node_id in sorted(table["ours"])}
    if args.cubiq is not None:
        missing = sorted(set(table["nodes"]) - set(info))
        if missing:
            raise SystemExit(f"--cubiq {args.cubiq} does not define {', '.join(missing)}")
        for node_id, rule in table["nodes"].items():
            rule["schema"] = {"display_name": info[node_id]["display_name"], "category": info[node_id]["category"],
                              "output_node": info[node_id]["output_node"], **node_schema(info[node_id])}
    TABLE_PATH.write_text(dumps(table) + "\n")
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
