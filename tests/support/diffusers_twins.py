"""diffusers models holding a host model's weights, through the host's own key maps (``comfy.utils.*_to_diffusers``)."""
from __future__ import annotations

from tools.factory.dit_models import FLUX_REDUCED
from tools.factory.edit_models import TINY_SD15_DIFFUSERS

TINY_DIFFUSERS = TINY_SD15_DIFFUSERS  # the tiny factory UNet's diffusers config


def diffusers_twin(model, config: dict):
    """diffusers' UNet2DConditionModel holding the host model's UNet weights (fp32, eval)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    host_sd = model.model.diffusion_model.state_dict()
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict({k: host_sd[mapping[k]].float() for k in unet.state_dict()}, strict=True)
    return unet.eval()


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


def flux_twin(model, config: dict = FLUX_REDUCED):
    """diffusers' FluxTransformer2DModel holding the host Flux model's weights (fp32, eval), through the host's map;
    ``config`` the host file's settings (the factory's FLUX.1-dev layout by default)."""
    import comfy.utils
    from diffusers import FluxTransformer2DModel
    host_sd = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.flux_to_diffusers(config)
    twin = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=config["depth"],
                                  num_single_layers=config["depth_single_blocks"], attention_head_dim=128,
                                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                  guidance_embeds=True, axes_dims_rope=tuple(config["axes_dim"]))
    twin.load_state_dict(diffusers_state(twin, mapping, host_sd), strict=True)
    return twin.eval()
