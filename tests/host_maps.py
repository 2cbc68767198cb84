"""The host model's weights for a diffusers twin, through one of the host's own key maps (``comfy.utils.*_to_diffusers``)."""
from __future__ import annotations


def diffusers_state(twin, mapping: dict, host_sd: dict) -> dict:
    """``twin``'s state dict filled from ``host_sd``: each diffusers key maps to a host key, or to (host key, (dim,
    offset, size) or None[, function]) where the host fuses several diffusers tensors into one (qkv)."""
    state = {}
    for key in twin.state_dict():
        target = mapping[key]
        if isinstance(target, str):
            state[key] = host_sd[target]
            continue
        value = host_sd[target[0]]
        if target[1] is not None:
            value = value.narrow(*target[1])
        state[key] = target[2](value) if len(target) > 2 else value
    return state
