"""Flux inputs: conditioning and sampling for the nodes, latents and conditioning for the transformer itself; the
host's transformer called as its sampler calls it, and diffusers' token layout of a latent."""
from __future__ import annotations

import torch

LATENT_HW = (8, 12)  # 4 x 6 tokens: not square, so a mask maps to the grid only one way
TEXT_TOKENS = 5


def conditioning(seed: int):
    """Flux conditioning as its text encode node makes it: T5 tokens [1, 5, 4096], CLIP-L pooled, guidance."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT_TOKENS, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                               "guidance": 3.5}]]


def sample(host, model, cfg: float):
    """The host's KSampler on ``model``: 2 Euler steps from a 16-channel latent [1, 16, 8, 12]."""
    latent = {"samples": torch.zeros(1, 16, *LATENT_HW)}
    (out,) = host.KSampler().sample(model, 7, 2, cfg, "euler", "simple", conditioning(1), conditioning(2), latent)
    return out["samples"]


def inputs(batch: int, seed: int = 0):
    """One transformer call's inputs: (latent x, t, T5 context, CLIP-L pooled y, guidance, the generator)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *LATENT_HW, generator=g)
    context = torch.randn(batch, TEXT_TOKENS, 4096, generator=g)
    y = torch.randn(batch, 768, generator=g)
    return x, torch.full((batch,), 0.7), context, y, torch.full((batch,), 3.5), g


def load_flux(models_dir):
    """The factory's FLUX.1-dev layout (``diffusion_models/flux1_layout.pt`` in ``models_dir``) through the host's
    diffusion-model loader."""
    import comfy.sd
    import comfy.utils
    from tools import factory
    sd = comfy.utils.load_torch_file(str(models_dir / "diffusion_models" / factory.FLUX_FILE))
    return comfy.sd.load_diffusion_model_state_dict(sd)


def call_transformer(model, *args, cond_or_uncond, sigma: float = 0.5, **kwargs):
    """A host DiT's ``diffusion_model`` (Flux, Qwen-Image, ...) as its sampler calls it: the patcher's transformer
    options and wrappers, the chunk order and sigma in the options."""
    options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                   sigmas=torch.full((1,), sigma), wrappers=model.wrappers)
    with torch.no_grad():
        return model.model.diffusion_model(*args, transformer_options=options, **kwargs)


def pack(x: torch.Tensor) -> torch.Tensor:
    """A latent [B, C, H, W] as diffusers' Flux and Qwen-Image pipelines pack it: 2 x 2 patches, [B, H*W/4, 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``pack``'s inverse: [B, H*W/4, 4C] -> [B, C, H, W]."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(rows: int, cols: int, index: int = 0) -> torch.Tensor:
    """diffusers' Flux position ids of a token grid [rows*cols, 3]: (index, row, column); Kontext's reference has
    index 1."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, index), r, c], -1).reshape(-1, 3).float()
