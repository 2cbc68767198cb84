"""SigLIP's attention-pooling head: the one vector per image that InstantX's Flux adapter reads.

A learned probe token attends over the encoder's last hidden states (after its final LayerNorm), then a residual
MLP (GELU, tanh form):

    p = MHA(probe, X, X);   pooled = p + MLP(LayerNorm(p))      X [B, N, E] -> pooled [B, E]

Parameter names equal the keys under ``vision_model.head.`` in SigLIP files; sizes are read from their shapes.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_PREFIX = "vision_model.head."
LAYER_NORM_EPS = 1e-6  # SigLIP's


class PoolingHead(nn.Module):
    def __init__(self, width: int, mlp_width: int, heads: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, mlp_width), "fc2": nn.Linear(mlp_width, width)})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, N, E] (the last hidden states) -> [B, E]"""
        hidden = hidden.to(self.probe.dtype)
        pooled = self.attention(self.probe.expand(hidden.shape[0], -1, -1), hidden, hidden, need_weights=False)[0]
        mlp = self.mlp["fc2"](nn.functional.gelu(self.mlp["fc1"](self.layernorm(pooled)), approximate="tanh"))
        return (pooled + mlp)[:, 0]


def build_pooling_head(head: dict[str, torch.Tensor], heads: int) -> PoolingHead:
    """A float32 PoolingHead from the ``vision_model.head.*`` tensors (prefix removed), loaded strictly."""
    mlp_width, width = head["mlp.fc1.weight"].shape
    module = PoolingHead(width, mlp_width, heads)
    module.load_state_dict({k: v.float() for k, v in head.items()}, strict=True)
    return module.eval()
