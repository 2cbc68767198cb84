"""Open graphs built with ComfyUI_IPAdapter_plus on this pack: that pack's nodes become ours.

    python -m ipadapter_core.migrate IN.json [-o OUT.json]

Reads a workflow in the UI format (nodes and links as the editor saves them, with subgraphs and group
nodes) or the API format (node id -> class_type and inputs). Every node of that pack becomes the node
of this pack that does the same: widget values and inputs are mapped, input and output slots renumbered,
the link types IPADAPTER, IPADAPTER_PARAMS and WEIGHTS_STRATEGY renamed. Links, groups, titles, positions,
sizes, colours and the nodes of the host and of other packs are kept. One report line per node of that pack says:
mapped; mapped with a difference in behaviour (which); or what is not supported. Without -o the
migrated workflow goes to stdout and the report to stderr. A migrated workflow migrates to itself.

The mapping is data, ``migration_table.json`` beside this file (the frontend extension reads it too):
``nodes`` (that pack's node id -> ours: its widget order and defaults, how each of our widgets is
computed, which inputs and outputs go where, and what differs), ``ours`` (our nodes' inputs in the
host's order and outputs, from the host's /object_info) and ``types`` (link types to rename).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .weights import layer_weights, parse_block_weights

TABLE_PATH = Path(__file__).with_name("migration_table.json")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Our attention-block index of the middle block, and the block count, per layout (see weights.py).
MIDDLE_BLOCK = {"SD1.5": (6, 16), "SDXL": (4, 11)}


# Combos that list files of the user's folders: their options are not part of the table.
FILE_LISTS = {("ImagePromptAdapterLoader", "ipadapter_file"), ("ImagePromptLoadEmbeds", "embeds")}


def our_schema(info: dict) -> dict:
    """A node's entry in the table's ``ours`` from its /object_info entry: inputs in the host's order
    (required, then optional) with each widget's default, range and options; outputs."""
    inputs = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, options = (info["input"][section][name] + [{}])[:2]
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            spec = {"name": name, "type": kind, "widget": kind in WIDGET_TYPES and not options.get("forceInput")}
            if spec["widget"]:
                spec.update({key: options[key] for key in ("default", "min", "max", "control_after_generate")
                             if key in options})
                if kind == "COMBO" and (info["name"], name) not in FILE_LISTS:
                    spec["options"] = options["options"]
            inputs.append(spec)
    return {"inputs": inputs, "outputs": [{"name": name, "type": kind}
                                          for name, kind in zip(info["output_name"], info["output"])]}


@dataclass
class Conversion:
    """What one node of that pack becomes: our node type (None: left as it is), our widget values by
    name, where its inputs go (source name -> our name, None when dropped), where its output slots go
    (source slot -> our slot or None), and what the report says."""
    source: str
    target: str | None
    values: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    differences: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)


@dataclass
class ReportLine:
    where: str
    source: str
    target: str | None
    differences: list
    unsupported: list

    @property
    def status(self) -> str:
        if self.target is None or self.unsupported:
            return "not supported"
        return "mapped with a difference in behaviour" if self.differences else "mapped"

    def __str__(self) -> str:
        head = f"{self.where} {self.source} -> {self.target or '(left as it is)'}: {self.status}"
        parts = [f"not supported: {text}" for text in self.unsupported] + list(self.differences)
        return head + "".join(f"\n    - {part}" for part in parts)


def _holds(condition: dict, env: dict) -> bool:
    """{name: [values]} (value in the list) or {name: {"not": [values]}}, all of them."""
    return all(env.get(name) not in allowed["not"] if isinstance(allowed, dict) else env.get(name) in allowed
               for name, allowed in condition.items())


def _evaluate(expression, env: dict):
    """A literal, {"from": name}, or {"if": condition, "then": expression, "else": expression}."""
    if isinstance(expression, dict) and "from" in expression:
        return env[expression["from"]]
    if isinstance(expression, dict) and "if" in expression:
        return _evaluate(expression["then"] if _holds(expression["if"], env) else expression["else"], env)
    return expression


def _is_link(value) -> bool:
    """An API-format input that is a link: [source node id, output slot]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class MigrationTable:
    def __init__(self, data: dict):
        self.nodes, self.ours, self.types = data["nodes"], data["ours"], data["types"]
        self.option_maps, self.apply_notes = data["option_maps"], data["apply_notes"]

    @classmethod
    def load(cls, path: Path = TABLE_PATH) -> "MigrationTable":
        return cls(json.loads(Path(path).read_text()))

    def widgets(self, target: str) -> list[dict]:
        return [spec for spec in self.ours[target]["inputs"] if spec["widget"]]

    def link_inputs(self, target: str) -> list[dict]:
        return [spec for spec in self.ours[target]["inputs"] if not spec["widget"]]

    def source_widgets(self, source: str, given: list | dict) -> dict:
        """Widget values by name from a UI ``widgets_values`` (positional, possibly shorter: older versions
        of that pack had fewer widgets, always appended) or an API ``inputs`` dict."""
        rule = self.nodes[source]
        values = {name: default for name, default in rule["widgets"]}
        if isinstance(given, dict):
            values.update({name: value for name, value in given.items() if name in values})
        else:
            values.update(zip((name for name, _ in rule["widgets"]), given))
        return values

    def convert(self, source: str, values: dict, linked: set, linked_outputs: set) -> Conversion:
        """Our node for ``source`` with widget ``values`` (by name), the inputs that are linked (link
        inputs and widgets given by a link) and the output slots that are linked."""
        rule = self.nodes[source]
        if rule["to"] is None:
            return Conversion(source, None, unsupported=[rule["unsupported"]])
        conversion = Conversion(source, rule["to"], outputs=list(rule["outputs"]))
        from_widget = {}
        for spec in self.widgets(rule["to"]):
            name = spec["name"]
            expression = rule.get("values", {}).get(name, {"from": name} if name in values else spec.get("default"))
            value = _evaluate(expression, values)
            value = self.option_maps.get(rule.get("maps", {}).get(name), {}).get(str(value), value)
            conversion.values[name] = self._fit(spec, value, conversion)
            if isinstance(expression, dict) and set(expression) == {"from"}:
                from_widget[expression["from"]] = name
        ours = {spec["name"] for spec in self.ours[rule["to"]]["inputs"]}
        for name in sorted(linked):
            target = rule.get("rename", {}).get(name, name) if name in rule["inputs"] else from_widget.get(name)
            conversion.inputs[name] = target if target in ours else None
            if conversion.inputs[name] is None:
                conversion.unsupported.append(rule.get("dropped_inputs", {}).get(
                    name, f"the link into '{name}': {rule['to']} has no input that takes it"))
        for slot in sorted(linked_outputs):
            if slot >= len(conversion.outputs) or conversion.outputs[slot] is None:
                conversion.unsupported.append(rule.get("dropped_outputs", {}).get(
                    str(slot), f"output {slot}: {rule['to']} has no such output"))
        situation = {**values, **{f"linked {name}": True for name in linked}}
        for note in rule.get("notes", []):
            if _holds(note.get("when", {}), situation):
                (conversion.unsupported if note.get("unsupported") else conversion.differences).append(note["text"])
        if rule.get("apply"):
            conversion.differences += self._apply_differences(rule, conversion.values)
        return conversion

    def _fit(self, spec: dict, value, conversion: Conversion):
        """``value`` if our widget takes it; else the nearest it takes, with the reason in the report."""
        name = spec["name"]
        if spec["type"] == "COMBO" and "options" in spec and value not in spec["options"]:
            conversion.unsupported.append(f"{name} '{value}' (not one of {', '.join(map(str, spec['options']))}); "
                                          f"set to '{spec.get('default', spec['options'][0])}'")
            return spec.get("default", spec["options"][0])
        if spec["type"] in ("INT", "FLOAT") and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = spec.get("min", value), spec.get("max", value)
            if not low <= value <= high:
                fitted = min(max(value, low), high)
                conversion.differences.append(f"{name} {value} is outside {low}..{high}: set to {fitted}")
                return fitted
        return value

    def _apply_differences(self, rule: dict, values: dict) -> list[str]:
        """The middle block: that pack registered its patch under a block key the host never calls, so
        its middle block never saw the image; ours does, at the weight the weight type gives it."""
        kind = _evaluate(rule.get("weight_type_of", {"from": "weight_type"}), values)
        weight = values.get(rule.get("weight_of", "weight"), 1.0)
        weight, unit = (weight, "") if isinstance(weight, (int, float)) else (1.0, " x weight")
        shares = []
        for layout, (block, blocks) in MIDDLE_BLOCK.items():
            try:
                if values.get("layer_weights", "").strip():
                    share = weight * parse_block_weights(values["layer_weights"], blocks).get(block, 0.0)
                else:
                    share = layer_weights(kind, weight, [("middle", block)], blocks,
                                          values.get("composition_weight")).weights[0]
            except ValueError:  # block indices of the other layout
                continue
            if share:
                shares.append(f"{layout} block {block} gets {share:.3g}{unit}")
        notes = list(self.apply_notes["always"])
        if shares:
            notes.insert(0, f"{self.apply_notes['middle_block']} ({kind}: {', '.join(shares)})")
        return notes


@dataclass
class _SlotMaps:
    inputs: dict   # node id -> {old input slot: new slot or None}
    outputs: dict  # node id -> {old output slot: new slot or None}


def _link_fields(link) -> dict:
    if isinstance(link, dict):
        return link
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, link))


def _set_link_fields(link, values: dict):
    if isinstance(link, dict):
        link.update(values)
        return
    for index, key in enumerate(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")):
        if key in values and index < len(link):
            link[index] = values[key]


class _UiMigration:
    """One UI-format graph (the top level, a subgraph definition): its nodes and links in place."""

    def __init__(self, table: MigrationTable, graph: dict, where: str, report: list, unlink: bool = True):
        self.table, self.graph, self.where, self.report, self.unlink = table, graph, where, report, unlink
        self.maps = _SlotMaps({}, {})

    def run(self) -> None:
        for node in self.graph.get("nodes", []):
            if node.get("type") in self.table.nodes:
                self._node(node)
        self._links()
        for node in self.graph.get("nodes", []):
            for slot in node.get("inputs") or []:
                slot["type"] = self.table.types.get(slot.get("type"), slot.get("type"))
            for slot in node.get("outputs") or []:
                slot["type"] = self.table.types.get(slot.get("type"), slot.get("type"))
        for slot in self.graph.get("inputs", []) + self.graph.get("outputs", []):
            slot["type"] = self.table.types.get(slot.get("type"), slot.get("type"))

    def _node(self, node: dict) -> None:
        table, source = self.table, node["type"]
        inputs, outputs = node.get("inputs") or [], node.get("outputs") or []
        conversion = table.convert(source, table.source_widgets(source, node.get("widgets_values") or []),
                                   {slot["name"] for slot in inputs if slot.get("link") is not None},
                                   {index for index, slot in enumerate(outputs) if slot.get("links")})
        self.report.append(ReportLine(f"{self.where}node {node.get('id')}", source, conversion.target,
                                      conversion.differences, conversion.unsupported))
        if conversion.target is None:
            return
        rename = table.nodes[source].get("rename", {})
        ours_of = {slot["name"]: conversion.inputs.get(slot["name"]) or rename.get(slot["name"], slot["name"])
                   for slot in inputs}
        new_inputs = self._inputs(conversion.target, {ours_of[slot["name"]]: slot for slot in inputs})
        new_index = {slot["name"]: index for index, slot in enumerate(new_inputs)}
        self.maps.inputs[node["id"]] = {index: new_index.get(ours_of[slot["name"]])
                                        for index, slot in enumerate(inputs)}
        goes_to = conversion.outputs + [None] * max(0, len(outputs) - len(conversion.outputs))
        self.maps.outputs[node["id"]] = dict(enumerate(goes_to[:len(outputs)]))
        widgets_values = []
        for spec in table.widgets(conversion.target):
            widgets_values.append(conversion.values[spec["name"]])
            if spec.get("control_after_generate"):
                widgets_values.append("fixed")
        properties = {key: value for key, value in (node.get("properties") or {}).items()
                      if key not in ("cnr_id", "ver", "aux_id")}
        node.update(type=conversion.target, inputs=new_inputs,
                    outputs=self._outputs(conversion.target, outputs, goes_to), widgets_values=widgets_values,
                    properties={**properties, "Node name for S&R": conversion.target})

    def _inputs(self, target: str, before: dict) -> list[dict]:
        """Our input sockets: every link input in the host's order, then the widgets given by a link (or
        shown as sockets) before; ``before`` holds the old sockets by our input name."""
        sockets = [self._slot(before.get(spec["name"], {}), spec) for spec in self.table.link_inputs(target)]
        for spec in self.table.widgets(target):
            old = before.get(spec["name"])
            if old is not None and (old.get("widget") or old.get("link") is not None):
                sockets.append({**self._slot(old, spec), "widget": {"name": spec["name"]}})
        return sockets

    def _outputs(self, target: str, outputs: list[dict], goes_to: list) -> list[dict]:
        """Our output sockets, each with the links of the old output that goes to it."""
        sockets = [{"name": spec["name"], "type": spec["type"], "links": []}
                   for spec in self.table.ours[target]["outputs"]]
        for slot, new in zip(outputs, goes_to):
            if new is None:
                continue
            keep = {key: value for key, value in slot.items() if key not in ("name", "type", "label")}
            sockets[new].update({**keep, "links": slot.get("links") or []})
            if "slot_index" in slot:
                sockets[new]["slot_index"] = new
            if "localized_name" in slot:
                sockets[new]["localized_name"] = sockets[new]["name"]
        return sockets

    @staticmethod
    def _slot(before: dict, spec: dict) -> dict:
        keep = {key: value for key, value in before.items() if key not in ("name", "type", "label", "widget", "link")}
        slot = {**keep, "name": spec["name"], "type": spec["type"], "link": before.get("link")}
        if "localized_name" in before:
            slot["localized_name"] = spec["name"]
        return slot

    def _links(self) -> None:
        links, kept = self.graph.get("links") or [], []
        for link in links:
            fields = _link_fields(link)
            origin = self.maps.outputs.get(fields["origin_id"], {})
            target = self.maps.inputs.get(fields["target_id"], {})
            origin_slot = origin.get(fields["origin_slot"], fields["origin_slot"])
            target_slot = target.get(fields["target_slot"], fields["target_slot"])
            if origin_slot is None or target_slot is None:
                if self.unlink:
                    self._unlink(fields["id"])
                continue
            _set_link_fields(link, {"origin_slot": origin_slot, "target_slot": target_slot,
                                    "type": self.table.types.get(fields.get("type"), fields.get("type"))})
            kept.append(link)
        if "links" in self.graph:
            self.graph["links"] = kept

    def _unlink(self, link_id) -> None:
        """Remove every mention of a link whose end has no counterpart (already in the report)."""
        for node in self.graph.get("nodes", []):
            for slot in node.get("inputs") or []:
                if slot.get("link") == link_id:
                    slot["link"] = None
            for slot in node.get("outputs") or []:
                if link_id in (slot.get("links") or []):
                    slot["links"].remove(link_id)
        for slot in self.graph.get("inputs", []) + self.graph.get("outputs", []):
            if link_id in slot.get("linkIds", []):
                slot["linkIds"].remove(link_id)


def _migrate_group_nodes(table: MigrationTable, group_nodes: dict, report: list) -> None:
    """Legacy group nodes: a definition's inner nodes are addressed by position, its links are
    [origin index, origin slot, target index, target slot, origin id, type], its external outputs
    [index, slot, type]. The values on its instances are not rewritten (the report says so)."""
    for name, definition in group_nodes.items():
        nodes, links = definition.get("nodes", []), definition.get("links", [])
        had_id = [("id" in node, node.get("id")) for node in nodes]
        for index, node in enumerate(nodes):
            node["id"] = index
        fields = [{"id": index, "origin_id": link[0], "origin_slot": link[1], "target_id": link[2],
                   "target_slot": link[3], "type": link[5] if len(link) > 5 else None}
                  for index, link in enumerate(links)]
        migration = _UiMigration(table, {"nodes": nodes, "links": fields}, f"group node '{name}' ", report,
                                 unlink=False)
        lines = len(report)
        migration.run()
        for line in report[lines:]:
            if line.target:
                line.differences.append("inside a group node: check the widget values on its instances")
        definition["links"] = [[f["origin_id"], f["origin_slot"], f["target_id"], f["target_slot"],
                                *links[f["id"]][4:5], f["type"]] for f in migration.graph["links"]]
        for external in definition.get("external", []):
            if len(external) == 3 and isinstance(external[0], int) and isinstance(external[1], int):
                external[1] = migration.maps.outputs.get(external[0], {}).get(external[1], external[1])
                external[2] = table.types.get(external[2], external[2])
        for node, (present, value) in zip(nodes, had_id):
            if present:
                node["id"] = value
            else:
                del node["id"]


def _migrate_ui(table: MigrationTable, workflow: dict, report: list) -> None:
    _UiMigration(table, workflow, "", report).run()
    for subgraph in (workflow.get("definitions") or {}).get("subgraphs", []):
        _UiMigration(table, subgraph, f"subgraph '{subgraph.get('name', subgraph.get('id'))}' ", report).run()
    _migrate_group_nodes(table, (workflow.get("extra") or {}).get("groupNodes") or {}, report)


def _migrate_api(table: MigrationTable, prompt: dict, report: list) -> None:
    consumers = {}
    for node_id, node in prompt.items():
        for value in node.get("inputs", {}).values():
            if _is_link(value):
                consumers.setdefault(value[0], set()).add(value[1])
    out_maps = {}
    for node_id, node in prompt.items():
        source = node.get("class_type")
        if source not in table.nodes:
            continue
        inputs = node.get("inputs", {})
        values = table.source_widgets(source, {k: v for k, v in inputs.items() if not _is_link(v)})
        linked = {name for name, value in inputs.items() if _is_link(value)}
        conversion = table.convert(source, values, linked, consumers.get(node_id, set()))
        report.append(ReportLine(f"node {node_id}", source, conversion.target, conversion.differences,
                                 conversion.unsupported))
        if conversion.target is None:
            continue
        out_maps[node_id] = conversion.outputs
        from_source = {ours: inputs[name] for name, ours in conversion.inputs.items() if ours}
        new_inputs = {}
        for spec in table.ours[conversion.target]["inputs"]:
            if spec["name"] in from_source:
                new_inputs[spec["name"]] = from_source[spec["name"]]
            elif spec["widget"]:
                new_inputs[spec["name"]] = conversion.values[spec["name"]]
        node.update(class_type=conversion.target, inputs=new_inputs)
    for node in prompt.values():
        inputs = node.get("inputs", {})
        for name, value in list(inputs.items()):
            if _is_link(value) and value[0] in out_maps:
                slots = out_maps[value[0]]
                slot = slots[value[1]] if value[1] < len(slots) else None
                if slot is None:
                    del inputs[name]
                else:
                    value[1] = slot


def is_ui_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def is_api_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values())


def migrate(workflow: dict, table: MigrationTable | None = None) -> tuple[dict, list[ReportLine]]:
    """(the migrated copy of ``workflow``, one report line per node of that pack)."""
    table = table or MigrationTable.load()
    migrated, report = copy.deepcopy(workflow), []
    if is_ui_workflow(migrated):
        _migrate_ui(table, migrated, report)
    elif is_api_workflow(migrated):
        _migrate_api(table, migrated, report)
    else:
        raise ValueError("workflow: expected the UI format (a 'nodes' list) or the API format "
                         "(node id -> {'class_type', 'inputs'})")
    return migrated, report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_core.migrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="a workflow JSON (UI or API format)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the migrated workflow (default: stdout)")
    args = parser.parse_args(argv)
    try:
        migrated, report = migrate(json.loads(args.workflow.read_text()))
    except (OSError, ValueError) as err:
        print(f"{args.workflow}: {err}", file=sys.stderr)
        return 2
    text = json.dumps(migrated, indent=2, ensure_ascii=False) + "\n"
    log = sys.stdout if args.output else sys.stderr
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    for line in report:
        print(line, file=log)
    counts = {status: sum(line.status == status for line in report)
              for status in ("mapped", "mapped with a difference in behaviour", "not supported")}
    print(f"{len(report)} node(s) of ComfyUI_IPAdapter_plus: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
          file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
