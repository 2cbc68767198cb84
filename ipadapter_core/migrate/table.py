"""The migration table's rules applied: what one node of ComfyUI_IPAdapter_plus becomes (a Conversion) and
the report line it gives; ``node_schema`` writes the table's entry for a node's inputs and outputs from the host's /object_info."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..weights import layer_weights, parse_block_weights

TABLE_PATH = Path(__file__).parents[1] / "migration_table.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Our attention-block index of the middle block, and the block count, per layout (see weights.py).
MIDDLE_BLOCK = {"SD1.5": (6, 16), "SDXL": (4, 11)}


# Combos that list files of the user's folders: their options are not part of the table.
FILE_LISTS = {("ImagePromptAdapterLoader", "ipadapter_file"), ("ImagePromptLoadEmbeds", "embeds"),
              ("IPAdapterModelLoader", "ipadapter_file"), ("IPAdapterLoadEmbeds", "embeds")}
WIDGET_KEYS = ("default", "min", "max", "step", "multiline", "control_after_generate")


def node_schema(info: dict) -> dict:
    """A node's inputs and outputs from its /object_info entry (our nodes' entries in the table's ``ours``, that
    pack's in each rule's ``schema``): inputs in the host's order (required, then optional, marked) with each
    widget's default, range, step and options (not those of ``FILE_LISTS``, which list the user's files)."""
    inputs = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, options = (info["input"][section][name] + [{}])[:2]
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            spec = {"name": name, "type": kind, "widget": kind in WIDGET_TYPES and not options.get("forceInput")}
            if section == "optional":
                spec["optional"] = True
            if spec["widget"]:
                spec.update({key: options[key] for key in WIDGET_KEYS if key in options})
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


class MigrationTable:
    """The table's ``nodes`` (that pack's node id -> its rule), ``ours`` (our nodes' inputs and outputs) and
    ``types`` (link types to rename); ``convert`` applies one rule."""

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
