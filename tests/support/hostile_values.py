"""Hostile values for every input of a node, generated from its schema as the server's /object_info serves it.

A *carrier* is a prompt that runs (on the factory models) and holds the node; each case changes one input of that
node in a copy of it: a FLOAT gets a non-finite value (NaN, +inf or -inf, drawn by a seeded generator) as its
widget value and the largest value a primitive node passes (9e18, past any range the host checks, since it checks
widgets only); an INT gets 2**62 and -2**62 through a primitive; a STRING one of a NUL byte, a path out of the
folders, 20 000 characters or bidirectional-control text (drawn); a combo a value not among its options; a MASK
a NaN mask, a one-pixel mask and a batch of three; an IMAGE a one-pixel image, a NaN image and a batch of three;
one socket per node gets an output of the wrong type. Optional MASK and IMAGE inputs that the
carrier leaves open get them too.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Callable

SEED = 38
# Valid inputs (a mask of another size is stretched, a batch of masks is one per frame, a batch of images is used
# together): they run the whole prompt.
ACCEPTED = ("one-pixel mask", "mask batch of 3", "image batch of 3")
WIDGETS = ("FLOAT", "INT", "STRING", "BOOLEAN", "COMBO")
STRINGS = {"NUL byte": "name\x00.png", "path out of the folders": "../../../../etc/passwd",
           "20 000 characters": "x" * 20000, "bidirectional controls": "\u202etxt.exe\u202c\ufeff"}
PRIMITIVES = {"FLOAT": "PrimitiveFloat", "INT": "PrimitiveInt"}
HUGE = {"FLOAT": (9e18,), "INT": (2 ** 62, -(2 ** 62))}


def _solid(value, side: int = 64) -> dict:
    return {"class_type": "SolidMask", "inputs": {"value": value, "width": side, "height": side}}


def _empty_image(side: int = 64, batch: int = 1) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": batch,
                                                   "color": 0x7F3F9F}}


# Sources of hostile MASK and IMAGE values: {kind: nodes to add, the first one's output 0 being the value}.
MASKS = {
    "NaN mask": lambda: [_solid(math.nan)],
    "one-pixel mask": lambda: [_solid(1.0, side=1)],
    "mask batch of 3": lambda: [{"class_type": "ImageToMask", "inputs": {"image": ["@1", 0], "channel": "red"}},
                                {"class_type": "RepeatImageBatch", "inputs": {"image": ["@2", 0], "amount": 3}},
                                {"class_type": "MaskToImage", "inputs": {"mask": ["@3", 0]}}, _solid(1.0)],
}
IMAGES = {
    "one-pixel image": lambda: [_empty_image(side=1)],
    "NaN image": lambda: [{"class_type": "ImageBlend", "inputs": {"image1": ["@1", 0], "image2": ["@1", 0],
                                                                  "blend_factor": math.nan, "blend_mode": "normal"}},
                          _empty_image()],
    "image batch of 3": lambda: [_empty_image(batch=3)],
}


@dataclass(frozen=True)
class Case:
    """One hostile value for one input of the node ``node`` (a key of the carrier prompt)."""
    node: str
    class_type: str
    input: str
    kind: str  # the class of value, e.g. "FLOAT non-finite"; the report counts by it
    value: str  # the value as the report shows it
    change: Callable[[dict], None]

    def prompt(self, carrier: dict) -> dict:
        prompt = copy.deepcopy(carrier)
        self.change(prompt)
        return prompt


def schema_inputs(info: dict) -> dict[str, tuple]:
    """Input name -> (type, options) of a node as /object_info serves it (required and optional)."""
    inputs = {}
    for group in ("required", "optional"):
        for name, entry in info["input"].get(group, {}).items():
            kind, options = entry[0], entry[1] if len(entry) > 1 else {}
            inputs[name] = ("COMBO" if isinstance(kind, list) else kind, options)
    return inputs


def _set_value(node: str, name: str, value):
    def change(prompt):
        prompt[node]["inputs"][name] = value
    return change


def _link_from(node: str, name: str, sources: list[dict]):
    """Feed ``name`` from the first of ``sources`` (nodes added as "hostile_<i>"; "@i" links name the i-th)."""
    def change(prompt):
        keys = [f"hostile_{i}" for i in range(len(sources))]
        for key, source in zip(keys, sources):
            source = copy.deepcopy(source)
            for input_name, value in source["inputs"].items():
                if isinstance(value, list) and str(value[0]).startswith("@"):
                    source["inputs"][input_name] = [keys[int(value[0][1:])], value[1]]
            prompt[key] = source
        prompt[node]["inputs"][name] = [keys[0], 0]
    return change


def _primitive(kind: str, value):
    return [{"class_type": PRIMITIVES[kind], "inputs": {"value": value}}]


def hostile_cases(carrier: dict, node: str, info: dict, full: bool = False) -> list[Case]:
    """The cases for the node ``node`` of ``carrier``, whose schema is ``info`` (its /object_info entry); the
    values that are valid input (ACCEPTED: they run the whole carrier, tens of seconds on 2 cores with a full-size
    CLIP vision encoder) only when ``full``."""
    class_type = carrier[node]["class_type"]
    rng = random.Random(f"{SEED}:{class_type}")
    given = carrier[node]["inputs"]
    cases = []

    def add(name, kind, value, change):
        cases.append(Case(node, class_type, name, kind, value, change))

    sockets = []
    for name, (kind, options) in schema_inputs(info).items():
        if kind == "FLOAT":
            bad = rng.choice((math.nan, math.inf, -math.inf))
            add(name, "FLOAT non-finite", str(bad), _set_value(node, name, bad))
        if kind in HUGE:
            for value in HUGE[kind]:
                add(name, f"{kind} past its range, through a primitive", str(value),
                    _link_from(node, name, _primitive(kind, value)))
        elif kind == "STRING":
            label = rng.choice(sorted(STRINGS))
            add(name, "STRING odd text", label, _set_value(node, name, STRINGS[label]))
        elif kind == "COMBO":
            add(name, "combo value not among the options", "'\\x00nope'", _set_value(node, name, "\x00nope"))
        elif kind in ("MASK", "IMAGE"):
            sources = MASKS if kind == "MASK" else IMAGES
            for label in sources if full else [label for label in sources if label not in ACCEPTED]:
                add(name, label, label, _link_from(node, name, sources[label]()))
        elif kind not in WIDGETS and isinstance(given.get(name), list):
            sockets.append((name, kind))
    if sockets:
        name, kind = rng.choice(sockets)
        wrong, label = ([_empty_image()], "an IMAGE") if kind == "MASK" else ([_solid(1.0)], "a MASK")
        add(name, "socket fed an output of the wrong type", label, _link_from(node, name, wrong))
    return cases
