"""Running the host's nodes in this process, and reading what an Apply or Reference Controls node put in."""
from __future__ import annotations


def run_node(host, node_id: str, **inputs):
    """The outputs of the registered node ``node_id`` (a V3 node) run on ``inputs``, as the host runs it."""
    return host.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def adapters_of(model):
    """The adapter specs the UNet patch on ``model``'s cross-attention holds."""
    return next(iter(model.model_options["transformer_options"]["patches_replace"]["attn2"].values())).adapters


def hook_options(conditioning) -> dict:
    """The transformer options the hook on a controlled ``conditioning`` (Reference Controls') adds to its model
    calls: our APPLY_MODEL wrapper, to run one model call with it."""
    from comfy.hooks import EnumHookType
    (hook,) = conditioning[0][1]["hooks"].get_type(EnumHookType.TransformerOptions)
    return hook.transformers_dict
