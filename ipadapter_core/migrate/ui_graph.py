"""The UI format (nodes and links as the editor saves them): one graph's nodes of that pack become ours, their
sockets and links renumbered, link types renamed; the top level and each subgraph is one graph."""
from __future__ import annotations

from dataclasses import dataclass

from .table import MigrationTable, ReportLine

# The fields of a link, in the order of a link saved as a list.
LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


@dataclass
class _SlotMaps:
    inputs: dict   # node id -> {old input slot: new slot or None}
    outputs: dict  # node id -> {old output slot: new slot or None}


def _link_fields(link) -> dict:
    if isinstance(link, dict):
        return link
    return dict(zip(LINK_FIELDS, link))


def _set_link_fields(link, values: dict):
    if isinstance(link, dict):
        link.update(values)
        return
    for index, key in enumerate(LINK_FIELDS):
        if key in values and index < len(link):
            link[index] = values[key]


class UiGraphMigration:
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


def migrate_ui_graphs(table: MigrationTable, workflow: dict, report: list) -> None:
    """The top-level graph of a UI workflow and its subgraph definitions, in place."""
    UiGraphMigration(table, workflow, "", report).run()
    for subgraph in (workflow.get("definitions") or {}).get("subgraphs", []):
        UiGraphMigration(table, subgraph, f"subgraph '{subgraph.get('name', subgraph.get('id'))}' ", report).run()
