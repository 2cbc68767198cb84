"""Running the host's nodes in this process, and reading what an Apply node patched in."""
from __future__ import annotations


def run_node(host, node_id: str, **inputs):
    """The outputs of the registered node ``node_id`` (a V3 node) run on ``inputs``, as the host runs it."""
    return host.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def adapters_of(model):
    """The adapter specs the UNet patch on ``model``'s cross-attention holds."""
    return next(iter(model.model_options["transformer_options"]["patches_replace"]["attn2"].values())).adapters
