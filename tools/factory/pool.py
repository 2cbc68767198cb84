"""Seeded random weights that stay small on disk.

Every floating tensor is a strided view into one shared random pool per weight scale, so
``torch.save`` stores each pool once and a 600 M-parameter encoder becomes a few MB.
``torch.load(weights_only=True)`` (what the host uses for .ckpt/.pt/.bin) rebuilds the views,
and the host's loaders copy them into full-size parameters. safetensors files get contiguous copies.
"""
from __future__ import annotations

import math

import torch

POOL_SIZE = 1 << 20


def _is_norm_weight(name: str, shape: torch.Size) -> bool:
    leaf = name.rsplit(".", 2)
    return len(shape) == 1 and name.endswith("weight") and any("norm" in part or part.startswith("ln") for part in leaf)


class WeightPools:
    """Pools of random values, one per (scale, dtype); views into them are handed out by shape."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float16):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.pools: dict[str, torch.Tensor] = {}

    def _pool(self, kind: str) -> torch.Tensor:
        if kind not in self.pools:
            if kind == "ones":
                pool = torch.ones(POOL_SIZE)
            else:
                pool = torch.randn(POOL_SIZE, generator=self.generator) * float(kind)
            self.pools[kind] = pool.to(self.dtype)
        return self.pools[kind]

    def view(self, shape: tuple[int, ...], kind: str) -> torch.Tensor:
        """A tensor of ``shape`` drawn from pool ``kind`` ("ones" or a standard deviation)."""
        pool = self._pool(kind)
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=self.dtype)
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        if span > POOL_SIZE:  # squeeze the outer strides: rows then overlap, values stay random
            inner = 1 + sum((n - 1) * s for n, s in zip(shape[1:], strides[1:]))
            strides[0] = max(1, (POOL_SIZE - inner) // max(1, shape[0] - 1))
            span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
            if span > POOL_SIZE:
                raise ValueError(f"shape {shape} does not fit into a pool of {POOL_SIZE}")
        offset = int(torch.randint(0, POOL_SIZE - span + 1, (1,), generator=self.generator))
        return pool.as_strided(shape, strides, offset)

    def state_dict(self, shapes: dict[str, torch.Size], bias_std: float = 0.02) -> dict[str, torch.Tensor]:
        """Random tensors for every floating entry of ``shapes``: weights with std 1/sqrt(fan_in),
        norm weights of one, biases small."""
        out = {}
        for name, shape in shapes.items():
            if _is_norm_weight(name, shape):
                kind = "ones"
            elif len(shape) <= 1:
                kind = repr(bias_std)
            else:
                fan_in = math.prod(shape[1:])
                # one pool per power of two of fan_in keeps the file small and the scale right within sqrt(2)
                kind = repr(2.0 ** (-round(math.log2(fan_in)) / 2))
            out[name] = self.view(shape, kind)
        return out


def meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter and floating buffer shapes of a module built on the meta device."""
    return {k: v.shape for k, v in module.state_dict().items() if v.is_floating_point()}
