"""One message for a combo value that is not among its options, when the prompt is queued, on every host.

Hosts up to 0.3.x check only V1 combos before running a prompt; newer ones also check V3 combos and answer
``value_not_in_list``. Either way a node's own check of a combo would never be reached on the newer hosts, and the
older ones would run the graph up to the node first. So each node with combos gets a ``validate_inputs`` (the V3
hook that both hosts call when a prompt is queued) that takes its combos by name: the host then leaves those inputs
to it, and a bad value is refused with ``check_choice``'s message (the input, the value, the options). A node's own
``validate_inputs`` still runs first, for its own inputs. A combo fed by a link is checked where its value is used.
"""
from __future__ import annotations

import inspect

from comfy_api.latest import io

from ..ipadapter_core.choices import check_choice

_CHECKED = "_image_prompt_combo_check"


def combo_options(node: type[io.ComfyNode]) -> dict[str, list]:
    """Each combo input of ``node`` and its options as the schema gives them now (file lists change)."""
    return {spec.id: list(spec.options) for spec in node.define_schema().inputs if isinstance(spec, io.Combo.Input)}


def once_per_class(nodes: list[type[io.ComfyNode]], marker: str, add) -> list[type[io.ComfyNode]]:
    """``nodes``, each given ``add(node)`` unless its class already had it (a class attribute ``marker`` says so)."""
    for node in nodes:
        if marker not in node.__dict__:
            add(node)
            setattr(node, marker, True)
    return nodes


def with_named_combo_errors(nodes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """``nodes``, each with combos given the ``validate_inputs`` described above (once per class)."""
    return once_per_class(nodes, _CHECKED, add_combo_check)


def add_combo_check(node: type[io.ComfyNode]) -> None:
    own = node.__dict__.get("validate_inputs")
    own_params = list(inspect.signature(own.__func__).parameters.values())[1:] if own is not None else []
    own_names = [param.name for param in own_params]
    combos = [name for name in combo_options(node) if name not in own_names]
    if not combos:
        return

    def validate_inputs(cls, **values) -> bool | str:
        if own is not None:
            result = own.__func__(cls, **{name: values[name] for name in own_names if name in values})
            if result is not True:
                return result
        options = combo_options(node)
        for name in combos:
            if values.get(name) is not None:
                try:
                    check_choice(name, values[name], options[name])
                except ValueError as err:
                    return str(err)
        return True

    # The hosts read which inputs a validate_inputs takes from its signature (inspect.getfullargspec's args).
    param = inspect.Parameter
    validate_inputs.__signature__ = inspect.Signature(
        [param("cls", param.POSITIONAL_OR_KEYWORD), *own_params,
         *(param(name, param.POSITIONAL_OR_KEYWORD, default=None) for name in combos)])
    node.validate_inputs = classmethod(validate_inputs)
