"""What newer hosts offer, used where the host has it (found by what its API has, never by its version):

- search aliases (``io.Schema.search_aliases``): each of our nodes that a ComfyUI_IPAdapter_plus node maps to is
  found by that pack's display names and node ids, from the migration table (``add_search_aliases``);
- the node-replacement registry (``io.NodeReplace``, ``ComfyAPI().node_replacement``): with our copies of that pack's
  node ids off (COMFYUI_IPADAPTER_EDIT_COMPAT_IDS=0), each id whose rule a replacement can express exactly is
  registered (ipadapter_core/migrate/node_replace.py), so the editor offers its own swap for a missing node of that
  pack and the server replaces them in API prompts (``register_node_replacements``).
"""
from __future__ import annotations

import dataclasses
import logging
import sys

from comfy_api.latest import io

from ..ipadapter_core.migrate import MigrationTable
from ..ipadapter_core.migrate.node_replace import ReplacementPlan, lacks_mapped_input, plan, replace_in_prompt
from .compat_nodes import SWITCH, switched_off

_ALIASED = "_image_prompt_search_aliases"
_registered: ReplacementPlan | None = None


async def apply_host_features(nodes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """The extension's one call: ``nodes`` with search aliases, and the node replacements registered (where the
    host has each)."""
    await register_node_replacements()
    return add_search_aliases(nodes)


def host_has_search_aliases() -> bool:
    return dataclasses.is_dataclass(io.Schema) and "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(table: MigrationTable) -> dict[str, list[str]]:
    """Our node id -> the display names and node ids of that pack's nodes the table maps to it, in table order."""
    aliases: dict[str, list[str]] = {}
    for source, rule in table.nodes.items():
        if rule["to"] is None:
            continue
        names = aliases.setdefault(rule["to"], [])
        names += [name for name in (rule["schema"]["display_name"], source) if name not in names]
    return aliases


def add_search_aliases(nodes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """``nodes``, each of those the table maps to given that pack's names as search aliases (its schema's own come
    first); unchanged on a host whose Schema has no search_aliases."""
    if not host_has_search_aliases():
        return nodes
    aliases = search_aliases(MigrationTable.load())
    for node in nodes:
        if _ALIASED in node.__dict__:
            continue
        define = node.define_schema.__func__

        def define_schema(cls, _define=define):
            schema = _define(cls)
            own = list(schema.search_aliases or [])
            extra = [name for name in aliases.get(schema.node_id, ()) if name not in own]
            if extra:
                schema.search_aliases = own + extra
            return schema

        node.define_schema = classmethod(define_schema)
        setattr(node, _ALIASED, True)
    return nodes


def _registry():
    """The host's node-replacement registry and its server, or None where the host has none (or no server runs)."""
    node_replace = getattr(io, "NodeReplace", None)
    try:
        from comfy_api.latest import ComfyAPI
        from server import PromptServer
    except ImportError:
        return None
    registry = getattr(ComfyAPI(), "node_replacement", None)
    server = getattr(PromptServer, "instance", None)
    if node_replace is None or registry is None or server is None:
        return None
    return registry, server


async def register_node_replacements() -> ReplacementPlan | None:
    """With our copies of that pack's ids off and a host that has the registry: register a replacement for each id
    the plan offers, log the ids it does not offer (and why), and apply the same replacements to an API prompt's
    nodes the host's own code cannot replace. Returns the plan registered, or None."""
    global _registered
    if _registered is not None or not switched_off():
        return _registered
    found = _registry()
    if found is None:
        return None
    registry, server = found
    replacements = plan()
    for fields in replacements.offered.values():
        await registry.register(io.NodeReplace(**fields))
    if hasattr(server, "add_on_prompt_handler"):
        server.add_on_prompt_handler(lambda json_data: _replace_before_the_host(json_data, replacements.offered,
                                                                                server))
    _registered = replacements
    logging.info("IPAdapter Edit: %s is off: %d of ComfyUI_IPAdapter_plus's node ids are registered as node "
                 "replacements (the editor offers to swap them for this pack's nodes); not offered: %s", SWITCH,
                 len(replacements.offered), ", ".join(sorted(replacements.skipped)) or "none")
    for source, reason in sorted(replacements.skipped.items()):
        logging.info("IPAdapter Edit: no node replacement for %s: %s", source, reason)
    return replacements


def _replace_before_the_host(json_data, offered: dict, server):
    """An on_prompt handler: the host replaces the nodes of an API prompt whose class_type is not registered, but
    reads every mapped input and the node's ``_meta`` (a KeyError, the whole prompt refused, where an optional input
    is not linked or a program sent no ``_meta``). Those nodes get the same replacement here first, without the
    inputs they lack; the host's code still replaces the others."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    registered = sys.modules["nodes"].NODE_CLASS_MAPPINGS  # the host's nodes.py (not this package), loaded by now
    manager = getattr(server, "node_replace_manager", None)

    def ours_to_do(node) -> bool:
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind not in offered or kind in registered or not isinstance(node.get("inputs"), dict):
            return False
        chosen = manager.get_replacement(kind) if manager is not None else None
        if chosen and chosen[0].new_node_id != offered[kind]["new_node_id"]:
            return False  # the host applies another pack's replacement for this id
        return "_meta" not in node or lacks_mapped_input(offered[kind], node["inputs"])

    replace_in_prompt(prompt, offered, [node_id for node_id, node in prompt.items() if ours_to_do(node)])
    return json_data
