"""Every value a node of the pack receives, checked against the input it came through before the node runs.

The hosts check a widget's number against its min and max when a prompt is queued, but a NaN passes that check
(every comparison with it is false; JSON carries it), and a value from a link (a primitive node, a math node) is
not checked at all. So each node here, ours and the compatible ids, runs its ``execute`` behind one check per
kind of input, read from its own schema: a FLOAT is finite and inside the input's range (each item of a list, as
Frame Weights gives one), an INT inside its range, a MASK and an IMAGE non-empty with finite values, a STRING
without NUL characters. A failing value stops the node with a message naming the input and what it takes, so no
NaN reaches sampling to come out as a black image. Checks that need more than one input (a mask batch against an
image batch) stay in the node that knows both.
"""
from __future__ import annotations

import functools
import inspect
import math
from numbers import Number

import torch
from comfy_api.latest import io

from .combo_check import once_per_class

_CHECKED = "_image_prompt_value_check"


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    return f" of at least {low}" if low is not None else f" of at most {high}" if high is not None else ""


def check_number(name: str, value, spec, kind: str) -> None:
    """A FLOAT or INT input's value (or each item of a list of them): a finite number inside ``spec``'s range."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    low, high = getattr(spec, "min", None), getattr(spec, "max", None)
    span = _range_text(low, high)
    for index, item in enumerate(items):
        where = f"item {index + 1} of the list is" if isinstance(value, (list, tuple)) else "got"
        if isinstance(item, torch.Tensor) and item.numel() == 1:
            item = item.item()
        if not isinstance(item, Number) or isinstance(item, complex):
            raise ValueError(f"{name}: expected {kind} numbers{span}; {where} {item!r}")
        if not math.isfinite(item):
            raise ValueError(f"{name}: expected a finite number{span}; {where} {item}")
        if (low is not None and item < low) or (high is not None and item > high):
            raise ValueError(f"{name}: expected a number{span}; {where} {item:g}")


def check_pixels(name: str, value, kind: str, ranks: tuple[int, ...], layout: str) -> None:
    """A MASK or IMAGE input: a tensor of one of ``ranks``, with at least one pixel, all of them finite."""
    if not isinstance(value, torch.Tensor) or value.ndim not in ranks:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a {kind} {layout}; got {got}")
    if value.numel() == 0:
        raise ValueError(f"{name}: expected a {kind} {layout} with at least one pixel; got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: the {kind} holds {bad} NaN or infinite values; expected finite values (0 to 1)")


def check_text(name: str, value) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{name}: the text holds a NUL character (\\x00), which no file name or setting takes")


def input_check(spec):
    """The check of one input definition, ``check(value)``, or None for kinds checked where they are used."""
    name = spec.id
    if isinstance(spec, io.Float.Input):
        return functools.partial(check_number, name, spec=spec, kind="finite")
    if isinstance(spec, io.Int.Input):
        return functools.partial(check_number, name, spec=spec, kind="whole")
    if isinstance(spec, io.Mask.Input):
        return functools.partial(check_pixels, name, kind="MASK", ranks=(2, 3), layout="[H, W] or [B, H, W]")
    if isinstance(spec, io.Image.Input):
        return functools.partial(check_pixels, name, kind="IMAGE", ranks=(4,), layout="[B, H, W, C]")
    if isinstance(spec, io.String.Input):
        return functools.partial(check_text, name)
    return None


def checks_of(node: type[io.ComfyNode]) -> dict:
    """Input name -> its check, for the inputs of ``node``'s schema that have one."""
    return {spec.id: check for spec in node.define_schema().inputs if (check := input_check(spec)) is not None}


def with_checked_values(nodes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """``nodes``, each running its ``execute`` after the checks of its inputs (once per class)."""
    return once_per_class(nodes, _CHECKED, add_value_checks)


def add_value_checks(node: type[io.ComfyNode]) -> None:
    own = inspect.unwrap(node.execute.__func__)
    checks = checks_of(node)

    def check(values: dict) -> None:
        for name, value in values.items():
            if value is not None and name in checks:
                checks[name](value)

    if inspect.iscoroutinefunction(own):
        @functools.wraps(own)
        async def execute(cls, **values):
            check(values)
            return await own(cls, **values)
    else:
        @functools.wraps(own)
        def execute(cls, **values):
            check(values)
            return own(cls, **values)
    node.execute = classmethod(execute)
