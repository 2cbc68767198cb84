"""Reference images as the nodes take them: [batch, height, width, RGB] in 0..1."""
from __future__ import annotations

import torch


def random_image(seed: int, h: int = 224, w: int = 224) -> torch.Tensor:
    """Uniform noise [1, h, w, 3] from ``seed``."""
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def ramp(h: int, w: int) -> torch.Tensor:
    """An image whose red channel is the column index and green the row index: crops are readable."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([cols, rows, torch.zeros_like(rows)], dim=-1)[None]
