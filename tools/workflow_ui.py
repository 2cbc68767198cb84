"""Turn API-format workflows into UI-format graphs that the ComfyUI frontend opens by drag and drop.

    python -m tools.workflow_ui                    # every workflows/api/*.json -> workflows/<same name>.json
    python -m tools.workflow_ui workflows/api/X.json ...

The node schemas (which inputs are widgets, their order, output names and types, display names) come
from a headless host's ``GET /object_info``, so a graph always matches the nodes as the host serves them.
Node ids stay those of the API file; nodes are laid out left to right by their depth in the graph.
An API node's ``_meta.title`` becomes its title.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

from . import comfy_host

WORKFLOWS = comfy_host.REPO_ROOT / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The frontend's extra widget values: a seed's control-after-generate mode, an image upload button.
SEED_CONTROL = "fixed"
UPLOAD_VALUE = "image"
# Sizes as the frontend draws them: a title bar, a row per socket, a row per widget.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 14, 20, 24
NODE_WIDTH, TEXT_NODE_SIZE, IMAGE_PREVIEW_HEIGHT = 300, (400, 180), 280
COLUMN_GAP, ROW_GAP, ORIGIN = 70, 40, (40, 40)


def is_widget(spec: list) -> bool:
    """Whether an /object_info input spec ``[type, options?]`` is drawn as a widget (not a socket)."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of a node's inputs in the host's ``input_order``, required first."""
    inputs = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            inputs.append((name, specs[name], section == "optional"))
    return inputs


def widget_values(info: dict, api_inputs: dict) -> list:
    """``widgets_values`` in the frontend's order: each widget's value (its default when the API node
    links it or leaves it out), a seed-control mode after seeds, the upload button's value last."""
    values, upload = [], False
    for name, spec, _ in ordered_inputs(info):
        if not is_widget(spec):
            continue
        options = spec[1] if len(spec) > 1 else {}
        given = api_inputs.get(name)
        values.append(options.get("default") if given is None or _is_link(given) else given)
        if options.get("control_after_generate"):
            values.append(SEED_CONTROL)
        upload = upload or bool(options.get("image_upload"))
    return values + [UPLOAD_VALUE] if upload else values


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """The API nodes without titles, each widget input they leave out set to the host's default (what a
    graph saved by the frontend, which writes every widget, gives back)."""
    full = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        for name, spec, _ in ordered_inputs(object_info[node["class_type"]]):
            if name not in inputs and is_widget(spec) and len(spec) > 1 and "default" in spec[1]:
                inputs[name] = spec[1]["default"]
        full[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return full


def _depths(prompt: dict) -> dict[str, int]:
    """Column of each node: the longest chain of links from a node with no linked inputs."""
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: tuple[str, ...] = ()) -> int:
        if node_id in trail:
            raise ValueError(f"node {node_id}: the workflow has a cycle through {' -> '.join(trail)}")
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((visit(s, trail + (node_id,)) for s in sources), default=-1)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id)
    return depth


def _node_size(info: dict, sockets: int) -> list[int]:
    widgets = [spec for _, spec, _ in ordered_inputs(info) if is_widget(spec)]
    if any(len(spec) > 1 and spec[1].get("multiline") for spec in widgets):
        return list(TEXT_NODE_SIZE)
    options = [spec[1] for spec in widgets if len(spec) > 1]
    rows = len(widgets) + sum(bool(o.get("control_after_generate")) for o in options)
    preview = IMAGE_PREVIEW_HEIGHT if any(o.get("image_upload") for o in options) else 0
    return [NODE_WIDTH, TITLE_HEIGHT + SLOT_HEIGHT * max(sockets, len(info["output"])) + WIDGET_HEIGHT * rows + preview]


def api_to_ui(prompt: dict, object_info: dict, name: str = "workflow") -> dict:
    """A UI-format graph (frontend schema version 0.4) equal to the API-format ``prompt``."""
    missing = sorted({node["class_type"] for node in prompt.values()} - set(object_info))
    if missing:
        raise KeyError(f"the host does not know the node types {', '.join(missing)}")
    depth = _depths(prompt)
    order = sorted(prompt, key=lambda i: (depth[i], int(i)))
    links, nodes = [], {}
    for node_id in order:
        api_node, info = prompt[node_id], object_info[prompt[node_id]["class_type"]]
        unknown = set(api_node["inputs"]) - {name for name, _, _ in ordered_inputs(info)}
        if unknown:
            raise KeyError(f"node {node_id} ({api_node['class_type']}): no inputs named {', '.join(sorted(unknown))}")
        sockets = [(n, s, o) for n, s, o in ordered_inputs(info) if not is_widget(s)]
        widgets = [(n, s, o) for n, s, o in ordered_inputs(info) if is_widget(s)]
        inputs = []
        for input_name, spec, optional in sockets + widgets:
            entry = {"name": input_name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": None}
            if is_widget(spec):
                entry["widget"] = {"name": input_name}
            if optional:
                entry["shape"] = 7
            value = api_node["inputs"].get(input_name)
            if _is_link(value):
                origin, slot = value
                source = nodes[origin]
                link_id = len(links) + 1
                links.append([link_id, int(origin), slot, int(node_id), len(inputs), source["outputs"][slot]["type"]])
                source["outputs"][slot]["links"].append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        if any(len(spec) > 1 and spec[1].get("image_upload") for _, spec, _ in widgets):
            inputs.append({"name": "upload", "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None})
        nodes[node_id] = {
            "id": int(node_id), "type": api_node["class_type"], "pos": [0, 0], "size": _node_size(info, len(sockets)),
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs,
            "outputs": [{"name": out_name, "type": out_type, "links": [], "slot_index": slot}
                        for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))],
            "title": api_node.get("_meta", {}).get("title") or info.get("display_name") or api_node["class_type"],
            "properties": {"Node name for S&R": api_node["class_type"]},
            "widgets_values": widget_values(info, api_node["inputs"]),
        }
    _layout(nodes, depth, links)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-ipadapter-edit/{name}")), "revision": 0,
        "last_node_id": max(int(i) for i in prompt), "last_link_id": len(links),
        "nodes": [nodes[i] for i in sorted(nodes, key=int)], "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4,
    }


def _layout(nodes: dict[str, dict], depth: dict[str, int], links: list[list]) -> None:
    """Columns left to right by depth; within a column, nodes follow the mean row of what feeds them."""
    feeders: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for _, origin, _, target, _, _ in links:
        feeders[str(target)].append(str(origin))
    columns: dict[int, list[str]] = {}
    for node_id in nodes:
        columns.setdefault(depth[node_id], []).append(node_id)
    x = ORIGIN[0]
    for column in sorted(columns):
        ids = sorted(columns[column], key=lambda i: (
            sum(nodes[f]["pos"][1] for f in feeders[i]) / max(len(feeders[i]), 1), int(i)))
        y = ORIGIN[1]
        for node_id in ids:
            nodes[node_id]["pos"] = [x, y]
            y += nodes[node_id]["size"][1] + ROW_GAP
        x += max(nodes[i]["size"][0] for i in ids) + COLUMN_GAP


def host_object_info() -> dict:
    """``/object_info`` of a headless host with this pack (started and stopped here)."""
    with tempfile.TemporaryDirectory(prefix="workflow-ui-") as base, comfy_host.HostServer(Path(base)) as server:
        return server.get_json("/object_info")


def write_ui_twins(api_files: list[Path], object_info: dict) -> list[Path]:
    written = []
    for api_file in api_files:
        graph = api_to_ui(json.loads(api_file.read_text()), object_info, api_file.stem)
        target = WORKFLOWS / api_file.name
        target.write_text(json.dumps(graph, indent=1) + "\n")
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("api_files", nargs="*", type=Path, help="API-format workflows (default: workflows/api/*.json)")
    args = parser.parse_args(argv)
    for path in write_ui_twins(args.api_files or sorted((WORKFLOWS / "api").glob("*.json")), host_object_info()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
