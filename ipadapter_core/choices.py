"""One check for an input that takes one of a list of values, with the error every node gives for it."""
from __future__ import annotations

from collections.abc import Iterable


def check_choice(name: str, value, options: Iterable) -> None:
    """ValueError naming the input ``name``, the ``value`` given and the ``options`` it takes, unless it is one."""
    options = list(options)
    if value not in options:
        raise ValueError(f"{name}: '{value}' is not one of {', '.join(map(str, options))}")
