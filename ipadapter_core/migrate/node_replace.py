"""The migration table as the host's node replacements (``io.NodeReplace``, ComfyUI 0.28 on): for each node id of
ComfyUI_IPAdapter_plus, our node, which of its inputs each of ours takes (``old_id``) or the fixed value it gets
(``set_value``), that pack's widget order (``old_widget_ids``) and the outputs. The host applies them in the editor
(the swap it offers for a missing node) and to API prompts whose class_type is not registered, so a replacement is
offered only where it gives what the table's rule gives (``plan``) and never a different graph:

- every widget of ours is one widget of that pack renamed, or a fixed value; a value computed from other values
  (the table's ``if``) cannot be written as a replacement, so that node is not offered;
- an option the table translates (``maps``) goes through unchanged: offered only when that pack's default
  needs no translation and every option it translates is one our node refuses (an error, not another graph);
- every link input of that pack has an input of ours, every output slot one of ours; a widget of that pack with
  no counterpart only where the table says dropping it gives the same result, and no value the table marks not
  supported (the replacement could not refuse it).

``replaced_inputs`` and ``replace_in_prompt`` apply one the way the host does to API prompts, leaving out mapped
inputs a node does not have (the host reads every mapped input, so an absent optional one fails the whole prompt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .table import MigrationTable


@dataclass
class ReplacementPlan:
    """``offered``: that pack's node id -> its replacement (the fields of ``io.NodeReplace``, as its ``as_dict``
    writes them); ``skipped``: node id -> why none is offered."""
    offered: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _renamed_widget(table: MigrationTable, rule: dict, ours: dict, old: dict) -> str | None:
    """Why our widget ``ours`` cannot take that pack's widget ``old`` unchanged, or None."""
    number_types = {"INT": ("INT",), "FLOAT": ("INT", "FLOAT")}
    if old["type"] != ours["type"] and old["type"] not in number_types.get(ours["type"], ()):
        return f"{ours['name']} ({ours['type']}) cannot take {old['name']} ({old['type']})"
    default = dict(rule["widgets"]).get(old["name"])
    if ours["type"] in ("INT", "FLOAT") and isinstance(default, (int, float)) and \
            not ours.get("min", default) <= default <= ours.get("max", default):
        return f"{old['name']}'s default {default} is outside {ours['name']}'s range"
    if ours["type"] != "COMBO" or "options" not in old or "options" not in ours:
        return None  # values out of our range (or our file lists) are refused by the host, as for our own node
    translate = table.option_maps.get(rule.get("maps", {}).get(ours["name"]), {})
    translated = {option: translate.get(str(option), option) for option in old["options"]}
    if default is not None and translated.get(default, default) != default:
        return f"{old['name']} '{default}' (that pack's default) is '{translated[default]}' here"
    if default is not None and default not in ours["options"]:
        return f"{old['name']} '{default}' (that pack's default) is not one of {ours['name']}'s options"
    silent = [option for option, value in translated.items() if value != option and option in ours["options"]]
    if silent:
        return f"{old['name']} '{silent[0]}' is '{translated[silent[0]]}' here, and our node takes both"
    return None  # the options the table translates are not ours: our node refuses them with their name


def node_replacement(table: MigrationTable, source: str) -> dict | str:
    """The replacement for that pack's ``source`` (``io.NodeReplace``'s fields), or why there is none."""
    rule = table.nodes[source]
    target = rule["to"]
    if target is None:
        return "no node of this pack does what it does"
    old_specs = {spec["name"]: spec for spec in rule["schema"]["inputs"]}
    old_widgets = [name for name, _ in rule["widgets"]]
    renames, problems, mapping, used = rule.get("rename", {}), [], [], set()
    for spec in table.ours[target]["inputs"]:
        name = spec["name"]
        if not spec["widget"]:
            for old in rule["inputs"]:
                if renames.get(old, old) == name:
                    mapping.append({"new_id": name, "old_id": old})
                    used.add(old)
            continue
        expression = rule.get("values", {}).get(name, {"from": name} if name in old_widgets else spec.get("default"))
        if isinstance(expression, dict) and "if" in expression:
            problems.append(f"{name} is computed from {', '.join(sorted(_condition_names(expression)))}")
        elif isinstance(expression, dict) and "from" in expression:
            old = expression["from"]
            problem = _renamed_widget(table, rule, spec, old_specs[old])
            if problem:
                problems.append(problem)
            mapping.append({"new_id": name, "old_id": old})
            used.add(old)
        else:
            value = table.option_maps.get(rule.get("maps", {}).get(name), {}).get(str(expression), expression)
            mapping.append({"new_id": name, "set_value": value})
    for old in rule["inputs"]:
        if old not in used:
            problems.append(f"the link into {old} has no input here")
    documented = {name for note in rule.get("notes", []) if not note.get("unsupported")
                  for name in note.get("when", {})}
    for old in old_widgets:
        if old not in used and old not in documented:
            problems.append(f"{old} has no counterpart here")
    for note in rule.get("notes", []):
        if note.get("unsupported"):
            problems.append(f"not supported, and a replacement cannot refuse it: {note['text']}")
    outputs = [{"new_idx": slot, "old_idx": index} for index, slot in enumerate(rule["outputs"]) if slot is not None]
    if len(outputs) != len(rule["schema"]["outputs"]):
        problems.append("an output has no counterpart here")
    if problems:
        return "; ".join(problems)
    return {"new_node_id": target, "old_node_id": source, "old_widget_ids": old_widgets or None,
            "input_mapping": mapping or None, "output_mapping": outputs or None}


def _condition_names(expression) -> set:
    if not isinstance(expression, dict):
        return set()
    if "from" in expression:
        return {expression["from"]}
    names = set(expression.get("if", {}))
    return names | _condition_names(expression.get("then")) | _condition_names(expression.get("else"))


def plan(table: MigrationTable | None = None) -> ReplacementPlan:
    """A replacement for each node id the table maps where one gives what the rule gives; the reasons for the others."""
    table = table or MigrationTable.load()
    result = ReplacementPlan()
    for source, rule in table.nodes.items():
        if rule["to"] is None:
            continue
        replacement = node_replacement(table, source)
        if isinstance(replacement, dict):
            result.offered[source] = replacement
        else:
            result.skipped[source] = replacement
    return result


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def replaced_inputs(replacement: dict, inputs: dict) -> dict:
    """Our node's inputs from that pack's node's ``inputs`` (API format), as the host maps them; a mapped input the
    node does not have is left out (as the editor leaves out an unlinked one)."""
    result = {}
    for entry in replacement["input_mapping"] or ():
        if "set_value" in entry:
            result[entry["new_id"]] = entry["set_value"]
        elif entry["old_id"] in inputs:
            result[entry["new_id"]] = inputs[entry["old_id"]]
    return result


def lacks_mapped_input(replacement: dict, inputs: dict) -> bool:
    return any("old_id" in entry and entry["old_id"] not in inputs for entry in replacement["input_mapping"] or ())


def replace_in_prompt(prompt: dict, replacements: dict, node_ids) -> None:
    """Replace the nodes ``node_ids`` of an API ``prompt`` in place, each by ``replacements[its class_type]``, and
    renumber the output slots the links into them read."""
    outputs = {}
    for node_id in node_ids:
        node = prompt[node_id]
        replacement = replacements[node["class_type"]]
        node["inputs"] = replaced_inputs(replacement, node["inputs"])
        node["class_type"] = replacement["new_node_id"]
        outputs[node_id] = {entry["old_idx"]: entry["new_idx"] for entry in replacement["output_mapping"] or ()}
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for name, value in (inputs or {}).items():
            if _is_link(value) and value[0] in outputs and value[1] in outputs[value[0]]:
                inputs[name] = [value[0], outputs[value[0]][value[1]]]
