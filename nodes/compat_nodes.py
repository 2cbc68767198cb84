"""ComfyUI_IPAdapter_plus's node ids, run by this pack: for the programs that post API prompts built for that pack
(Krita AI Diffusion, SwarmUI, scripts) and read its ids, inputs and option lists from /object_info.

Each compatible node is generated from the migration table: its inputs, option lists, defaults and outputs are
that pack's (the rule's ``schema``), and running it converts its values with the same rule that migrates a saved
graph and expands into the one node of ours that the rule names (the host's node expansion), which runs as it
would in a migrated graph (one without outputs, Save Embeds, runs in place). None is registered while a copy of that pack is installed (it keeps its ids) or with
COMFYUI_IPADAPTER_EDIT_COMPAT_IDS=0."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io
from comfy_execution.graph_utils import GraphBuilder

from ..ipadapter_core.choices import check_choice
from ..ipadapter_core.migrate import MigrationTable
from .ipadapter_inputs import CATEGORY

SWITCH = "COMFYUI_IPADAPTER_EDIT_COMPAT_IDS"
PACK_ROOT = Path(__file__).resolve().parents[1]
COMPAT_CATEGORY = f"{CATEGORY}/ComfyUI_IPAdapter_plus ids"
_logged_differences: set[tuple[str, str]] = set()


def switched_off() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def installed_copy(node_ids, roots) -> Path | None:
    """A folder or file in one of ``roots`` (the ``custom_nodes`` paths), enabled (not ``.disabled``) and not
    this pack, whose top-level Python files register one of ``node_ids`` in a NODE_CLASS_MAPPINGS."""
    quoted = [f'"{node_id}"' for node_id in node_ids] + [f"'{node_id}'" for node_id in node_ids]
    for root in roots:
        for entry in sorted(Path(root).iterdir()) if Path(root).is_dir() else ():
            if entry.name.endswith(".disabled") or entry.name.startswith(".") or entry.resolve() == PACK_ROOT:
                continue
            files = sorted(entry.glob("*.py")) if entry.is_dir() else [entry] if entry.suffix == ".py" else []
            for file in files:
                text = file.read_text(errors="replace")
                if "NODE_CLASS_MAPPINGS" in text and any(name in text for name in quoted):
                    return entry
    return None


def widget_input(spec: dict, file_options, tooltip: str):
    """One of that pack's widgets as a V3 input; a combo of the user's files lists what ``file_options()`` gives."""
    name, common = spec["name"], dict(optional=spec.get("optional", False), tooltip=tooltip)
    numbers = {key: spec[key] for key in ("default", "min", "max", "step") if key in spec}
    if spec["type"] == "INT":
        return io.Int.Input(name, **common, **numbers)
    if spec["type"] == "FLOAT":
        return io.Float.Input(name, **common, **numbers)
    if spec["type"] == "STRING":
        return io.String.Input(name, **common, default=spec.get("default"), multiline=spec.get("multiline"))
    if spec["type"] == "BOOLEAN":
        return io.Boolean.Input(name, **common, default=spec.get("default"))
    return io.Combo.Input(name, options=spec["options"] if "options" in spec else file_options(),
                          default=spec.get("default"), **common)


def counterpart(rule: dict, spec: dict) -> str | None:
    """The input of ours that an input of that pack's node becomes under its migration ``rule``: a link input by its
    name or the rule's ``rename``, a widget where the rule takes our widget's value ``from`` it or leaves our widget
    of the same name to it; None where none does."""
    name, values = spec["name"], rule.get("values", {})
    if not spec["widget"]:
        return rule.get("rename", {}).get(name, name) if name in rule["inputs"] else None
    taken = [ours for ours, expression in values.items() if expression == {"from": name}]
    return taken[0] if taken else (name if name not in values else None)


def tooltips(rule: dict, source: str, target_inputs) -> dict[str, str]:
    """Each input's tooltip: that of the input of ours it becomes, or a short one saying it has none."""
    ours = {spec.id: spec.tooltip for spec in target_inputs}
    tips = {}
    for spec in rule["schema"]["inputs"]:
        name = spec["name"]
        tips[name] = ours.get(counterpart(rule, spec)) or rule.get("dropped_inputs", {}).get(name) or \
            f"{source}'s {name}: {rule['to']} has no input for it (the migration report says what becomes of it)."
    return tips


def compatible_node(table: MigrationTable, source: str, target: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """The node ``source`` of that pack, with its schema, running ``target`` (our node the rule names)."""
    rule = table.nodes[source]
    schema = rule["schema"]
    widget_names = {spec["name"] for spec in schema["inputs"] if spec["widget"]}
    choices = {spec["name"]: spec["options"] for spec in schema["inputs"] if "options" in spec}

    def file_options(name: str) -> list:
        (ours,) = [spec for spec in target.define_schema().inputs if spec.id == name]
        return ours.options

    def define_schema(cls) -> io.Schema:
        tips = tooltips(rule, source, target.define_schema().inputs)
        inputs = [widget_input(spec, lambda name=spec["name"]: file_options(name), tips[spec["name"]]) if spec["widget"]
                  else io.Custom(spec["type"]).Input(spec["name"], optional=spec.get("optional", False),
                                                     tooltip=tips[spec["name"]])
                  for spec in schema["inputs"]]
        return io.Schema(
            node_id=source, display_name=f"{schema['display_name']} (IPAdapter Edit)", category=COMPAT_CATEGORY,
            description=f"ComfyUI_IPAdapter_plus's {source} with its inputs, run by this pack's {rule['to']} "
                        f"(for graphs and programs built for that pack; new graphs use {rule['to']}).",
            inputs=inputs, outputs=[io.Custom(out["type"]).Output(display_name=out["name"])
                                    for out in schema["outputs"]],
            is_output_node=schema["output_node"], enable_expand=True)

    def execute(cls, **given) -> io.NodeOutput:
        values = {name: value for name, value in given.items() if name in widget_names}
        for name, value in values.items():  # a value from a link (combo_check checks the others when queued)
            if name in choices:
                check_choice(name, value, choices[name])
        linked = {name for name, value in given.items() if name not in widget_names and value is not None}
        conversion = table.convert(source, values, linked, set())
        if conversion.unsupported:
            raise ValueError(f"{source} (run by {rule['to']}): " + "; ".join(conversion.unsupported))
        for text in conversion.differences:
            if (source, text) not in _logged_differences:
                _logged_differences.add((source, text))
                logging.info("%s (run by %s): %s", source, rule["to"], text)
        inputs = {ours: given[name] for name, ours in conversion.inputs.items()}
        inputs.update({spec["name"]: conversion.values[spec["name"]] for spec in table.widgets(rule["to"])})
        if not conversion.outputs:  # the host cannot expand a node into one without outputs: run it in place
            return target.execute(**inputs)
        graph = GraphBuilder()
        node = graph.node(rule["to"], **inputs)
        return io.NodeOutput(*(None if slot is None else node.out(slot) for slot in conversion.outputs),
                             expand=graph.finalize())

    return type(source, (io.ComfyNode,), {
        "__doc__": f"{source} of ComfyUI_IPAdapter_plus, run by {rule['to']}.", "__module__": __name__,
        "define_schema": classmethod(define_schema), "execute": classmethod(execute)})


def compatible_nodes(ours: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """The compatible nodes for every node id the migration table maps, or none (saying why, once)."""
    table = MigrationTable.load()
    mapped = [source for source, rule in table.nodes.items() if rule["to"] is not None]
    if switched_off():
        logging.info("IPAdapter Edit: %s is off: ComfyUI_IPAdapter_plus's node ids are not registered", SWITCH)
        return []
    copy = installed_copy(mapped, folder_paths.get_folder_paths("custom_nodes"))
    if copy is not None:
        logging.info("IPAdapter Edit: ComfyUI_IPAdapter_plus is installed (%s): its node ids stay its own, this "
                     "pack registers none of them", copy)
        return []
    by_id = {node.define_schema().node_id: node for node in ours}
    return [compatible_node(table, source, by_id[table.nodes[source]["to"]]) for source in mapped]
