"""FLUX.2 (dev) in its published layout at the real widths with reduced depth, through the host's own loader; its
diffusers twin holding the same tensors.

The keys and shapes come from the host's own Flux class built on the meta device with the settings its detection
gives a FLUX.2 file (``comfy/model_detection.py``: the ``double_stream_modulation_img.lin.weight`` key makes it
FLUX.2 and fixes 48 heads, RoPE axes (32, 32, 32, 32) = head width 128, MLP ratio 3 with SwiGLU, no biases, global
modulation, patch size 1, references by "index" at 10 apart). The host reads the width from ``img_in.weight``, but
48 heads of 128 tie it to 6144, FLUX.2-dev's; the input channels (128: the 32-channel latent in 2 x 2 patches) and the
text width (15360: three Mistral-Small-3.1 layers of 5120) are FLUX.2-dev's too. Only the depth is smaller: 1 double-
and 1 single-stream block instead of 8 and 48 (the global modulation layers alone are 0.57 B parameters, so this is
still 2.29 B). These are the key names Black Forest Labs' / Comfy-Org's flux2-dev files use (diffusers' own
``convert_flux2_transformer_checkpoint_to_diffusers``, which ``twin`` runs, maps every one of them).

Weights: the factory's pools (1/sqrt(fan_in), norm scales one), fp16 as the pools hold them. The host keeps them in
fp16 and computes in fp32 (its manual cast on a CPU): 4.6 GB instead of 9.2 GB, values unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from tools.factory.dit_models import published_names
from tools.factory.pool import WeightPools, meta_shapes

# What the host's detection gives a FLUX.2-dev file (0.3.75), at depth 1 + 1 instead of 8 + 48.
FLUX2_DEV = dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360, hidden_size=6144,
                 mlp_ratio=3.0, num_heads=48, depth=8, depth_single_blocks=48, axes_dim=[32, 32, 32, 32], theta=2000,
                 patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True,
                 ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                 txt_ids_dims=[3])  # 0.28+ hosts only (their FluxParams require it): the text position axis
FLUX2_REDUCED = dict(FLUX2_DEV, depth=1, depth_single_blocks=1)
FLUX2_SEED = 73
TEXT_WIDTH = FLUX2_DEV["context_in_dim"]
LATENT_CHANNELS = FLUX2_DEV["in_channels"]


def flux2_shapes(config: dict = FLUX2_REDUCED) -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams
    fields = {f.name for f in dataclasses.fields(FluxParams)}
    with torch.device("meta"):
        module = Flux(operations=comfy.ops.disable_weight_init, **{k: v for k, v in config.items() if k in fields})
    return published_names(meta_shapes(module))


def flux2_state_dict(config: dict = FLUX2_REDUCED, seed: int = FLUX2_SEED) -> dict[str, torch.Tensor]:
    """A FLUX.2 diffusion-model file's tensors (fp16 views into the pools: a few MB until the host copies them)."""
    return WeightPools(seed).state_dict(flux2_shapes(config))


def load_flux2(config: dict = FLUX2_REDUCED, seed: int = FLUX2_SEED):
    """The host's ModelPatcher for ``flux2_state_dict`` through ``comfy.sd.load_diffusion_model_state_dict``,
    weights kept in fp16 (``model_options`` dtype; the host's manual cast computes in fp32 on a CPU)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(flux2_state_dict(config, seed), {"dtype": torch.float16})


@dataclass
class Flux2Call:
    """One model call's inputs in the host's shapes: latent x [B, 128, H, W], t [B] (sigma), text tokens
    [B, T, 15360], reference latents [B, 128, h, w], guidance [B]."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    refs: list[torch.Tensor] = field(default_factory=list)
    guidance: torch.Tensor | None = None

    def with_refs(self, refs) -> "Flux2Call":
        return Flux2Call(self.x, self.t, self.context, list(refs), self.guidance)

    @staticmethod
    def random(seed: int, latent_hw=(3, 4), ref_hws=((2, 3), (3, 3)), text_tokens: int = 4, t: float = 0.7,
               guidance: float = 4.0) -> "Flux2Call":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, LATENT_CHANNELS, *latent_hw, generator=g)
        refs = [torch.randn(1, LATENT_CHANNELS, *hw, generator=g) for hw in ref_hws]
        context = torch.randn(1, text_tokens, TEXT_WIDTH, generator=g)
        return Flux2Call(x, torch.full((1,), t), context, refs, torch.full((1,), guidance))


def apply_model(model, call: Flux2Call, options: dict | None = None) -> torch.Tensor:
    """The host's ``BaseModel.apply_model`` as the sampler calls it (``options``: transformer options such as a
    hook's), returned as the transformer's velocity: apply_model gives x − σ·v on this flow model."""
    options = dict(options or {}, cond_or_uncond=[0] * call.x.shape[0], sigmas=call.t)
    kwargs = {"ref_latents": list(call.refs)} if call.refs else {}
    with torch.no_grad():
        denoised = model.model.apply_model(call.x, call.t, c_crossattn=call.context, guidance=call.guidance,
                                           transformer_options=options, **kwargs)
    return (call.x - denoised) / call.t.reshape(-1, 1, 1, 1)


class _Fp32(torch.nn.Module):
    """A parametrization that hands a module its fp16 tensor in fp32 on each use (the host's manual cast, in
    diffusers): the twin's parameters stay the host's own tensors, so it costs no memory."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value.float()


def twin(model):
    """diffusers' ``Flux2Transformer2DModel`` (the host model's depth) holding the host model's tensors, mapped by
    diffusers' own converter of the published FLUX.2 keys (qkv split as views; the final layer's shift/scale swapped,
    its only copy), computing in fp32."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    module = model.model.diffusion_model
    host_sd = dict(module.state_dict())
    converted = convert_flux2_transformer_checkpoint_to_diffusers(host_sd)
    with torch.device("meta"):
        out = Flux2Transformer2DModel(num_layers=len(module.double_blocks),
                                      num_single_layers=len(module.single_blocks))
    out.load_state_dict(converted, strict=True, assign=True)
    owners = [(sub, name) for sub in out.modules() for name, _ in sub.named_parameters(recurse=False)]
    for sub, name in owners:
        torch.nn.utils.parametrize.register_parametrization(sub, name, _Fp32(), unsafe=True)
    return out.eval()


def run_twin(twin_model, call: Flux2Call, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One call as ``Flux2Pipeline`` makes it: the latent's and each reference's tokens (patch size 1: one token a
    latent pixel) in that order, ids (T, row, column, L) = (0, r, c, 0) for the output, (10 + 10·i, r, c, 0) for
    reference i, (0, 0, 0, l) for text token l; the velocity in the host's latent shape."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    b, c, h, w = call.x.shape

    def tokens(latent):
        return latent.reshape(b, c, -1).permute(0, 2, 1)

    hidden = torch.cat([tokens(call.x), *(tokens(r) for r in call.refs)], dim=1)
    ids = Flux2Pipeline._prepare_latent_ids(call.x)
    if call.refs:
        ids = torch.cat([ids, Flux2Pipeline._prepare_image_ids([r[:1] for r in call.refs])], dim=1)
    text_ids = Flux2Pipeline._prepare_text_ids(call.context)
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
    with torch.no_grad():
        out = twin_model(hidden_states=hidden, encoder_hidden_states=call.context, timestep=call.t, img_ids=ids,
                         txt_ids=text_ids, guidance=call.guidance, joint_attention_kwargs=kwargs).sample
    return out[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w)
