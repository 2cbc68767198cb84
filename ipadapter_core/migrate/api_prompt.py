"""The API format (node id -> class_type and inputs): nodes of that pack become ours, links renumbered."""
from __future__ import annotations

from .table import MigrationTable, ReportLine


def _is_link(value) -> bool:
    """An API-format input that is a link: [source node id, output slot]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def migrate_api_prompt(table: MigrationTable, prompt: dict, report: list) -> None:
    """A prompt, in place."""
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
