"""What multiplies each adapter's image term on a layer: its mask on the layer's token grid, times its sigma gate.

The factor of a token group (A adapters) on a layer with N query positions is [B or 1, A, N or 1, 1]: a mask
resized to the layer's grid (ones without a mask), one row per batch row only when an adapter has a mask per
frame, times 0 or 1 for each adapter's sigma range. Masks and grids are made once per layer and latent size;
the gate is compared on the device (no host sync), once per step (a step is one ``sigmas`` tensor) and thread (the
host's multi-GPU samplers run calls of one model in several threads at once).
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from .adapter_spec import AdapterSpec
from .batch_layout import BatchLayout, DeviceIndices

# On the CPU, masks covering at most this share of a layer's rows run on those rows only. At half the rows this
# took 0.5-0.7x the time with 16 or 257 image tokens (even with 4); at three quarters, 1.1-1.8x with 4 or 16.
MASKED_ROWS_MAX_SHARE = 0.5
NO_RANGE = (float("inf"), float("-inf"))


def mask_grid(mask: torch.Tensor, tokens: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``mask`` [F, H, W] resized to the token grid of a layer with ``tokens`` positions: [F, tokens, 1].

    The grid is the latent size halved (rounding up, as the UNet's strided convolutions do) until it
    has ``tokens`` positions, so any aspect ratio maps exactly."""
    if latent_hw is None:
        raise ValueError("attn_mask: this model call did not give its latent size, so the mask cannot be placed")
    h, w = latent_hw
    while h * w > tokens and h * w > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"attn_mask: no token grid of {tokens} positions fits a latent of {latent_hw[0]}x{latent_hw[1]}")
    grid = torch.nn.functional.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear")
    return grid.reshape(mask.shape[0], tokens, 1)


class LayerGrid(NamedTuple):
    """A token group on one layer's grid, on a device: what its mask grids depend on."""
    group: tuple[int, ...]
    tokens: int
    latent_hw: tuple[int, int] | None
    device: torch.device
    dtype: torch.dtype


class ImageFactor:
    """The factors of one patch's adapters (see the module docstring), cached by ``LayerGrid``."""

    def __init__(self, adapters: tuple[AdapterSpec, ...]):
        self.adapters = adapters
        self._grids: dict[LayerGrid, torch.Tensor] = {}
        self._masked: dict[LayerGrid, torch.Tensor | None] = {}
        self._factors: dict[tuple[LayerGrid, BatchLayout | None], torch.Tensor] = {}
        self._ranges: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._mask_frames = DeviceIndices()
        self._step = threading.local()  # sigmas, gates (by group) and factors (by grid and layout) of this step

    def applies(self, group: tuple[int, ...]) -> bool:
        """Whether some adapter of ``group`` has a mask or a sigma range (else its factor is None)."""
        return any(self.adapters[i].mask is not None or self.adapters[i].sigma_range is not None for i in group)

    def factor(self, grid: LayerGrid, layout: BatchLayout, sigmas: torch.Tensor | None) -> torch.Tensor | None:
        """[B or 1, A, tokens or 1, 1] for ``grid``'s group in a batch of ``layout``, at the step of ``sigmas``;
        None when no adapter of the group has a mask or sigma range."""
        if not self.applies(grid.group):
            return None
        grids = self.mask_grids(grid)  # [A, F, tokens or 1, 1]
        per_frame = grids.shape[1] > 1
        key = (grid, layout if per_frame else None)
        factor = self._factors.get(key)
        if factor is None:
            factor = grids.transpose(0, 1)  # [1, A, tokens or 1, 1]
            if per_frame:
                last = grids.shape[1] - 1
                pick = self._mask_frames.get((layout, last), grid.device, lambda: [
                    min(f, last) for _ in range(layout.chunks) for f in layout.frame_of_rows()])
                factor = factor.index_select(0, pick)
            if not (per_frame and layout.frames):  # windows vary from step to step: their factors are not kept
                self._factors[key] = factor
        if all(self.adapters[i].sigma_range is None for i in grid.group):
            return factor
        step = self._step
        if sigmas is not getattr(step, "sigmas", None):
            step.sigmas, step.gates, step.factors = sigmas, {}, {}
        if key not in step.factors:
            step.factors[key] = factor * self._gate(step.gates, grid.group, sigmas, grid.device, grid.dtype)
        return step.factors[key]

    def _gate(self, gates: dict, group, sigmas, device, dtype) -> torch.Tensor:
        """[A, 1, 1]: 1 where this step's sigma is within the adapter's range, else 0 (on the device), kept in
        ``gates`` (this step's)."""
        if group not in gates:
            if (group, device) not in self._ranges:  # [A, 2] (high, low), copied to the device once
                self._ranges[(group, device)] = torch.tensor(
                    [self.adapters[i].sigma_range or NO_RANGE for i in group], device=device)
            high, low = self._ranges[(group, device)].unbind(1)
            gates[group] = ((sigmas[:1] <= high) & (sigmas[:1] >= low)).to(dtype)[:, None, None]
        return gates[group]

    def mask_grids(self, grid: LayerGrid) -> torch.Tensor:
        """Each adapter's masks on this layer's token grid, [A, F, tokens or 1, 1]: F the most masks an adapter of
        the group has (an adapter's last mask repeated after its own), ones for an adapter without a mask."""
        if grid not in self._grids:
            masks = [self.adapters[i].mask for i in grid.group]
            count = max((len(m) for m in masks if m is not None), default=1)
            rows = grid.tokens if any(m is not None for m in masks) else 1
            grids = [torch.ones(1, rows, 1) if m is None else mask_grid(m, grid.tokens, grid.latent_hw) for m in masks]
            self._grids[grid] = torch.stack([g[torch.arange(count).clamp(max=len(g) - 1)] for g in grids]).to(
                grid.device, grid.dtype)
        return self._grids[grid]

    def masked_rows(self, grid: LayerGrid) -> torch.Tensor | None:
        """The query rows [M] where some adapter of the group has a mask above 0 (on any frame), when every
        adapter has a mask and they cover at most ``MASKED_ROWS_MAX_SHARE`` of the rows; else None (all rows).
        Read back from the mask grids: for devices where that is free (the CPU)."""
        if any(self.adapters[i].mask is None for i in grid.group):
            return None
        if grid not in self._masked:
            rows = (self.mask_grids(grid).amax((0, 1))[:, 0] > 0).nonzero()[:, 0]
            self._masked[grid] = rows if len(rows) <= MASKED_ROWS_MAX_SHARE * grid.tokens else None
        return self._masked[grid]
