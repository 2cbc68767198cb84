"""Flux inputs: conditioning and sampling for the nodes, latents and conditioning for the transformer itself."""
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
