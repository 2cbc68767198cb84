"""What one call of the patch sees of the sampler's batch, and the index tensors made from it once.

A batch is ``chunks`` chunks (one per conditioning the sampler batched: cond, uncond, ...), each of ``rows``
latents. When the sampler runs the UNet on a window of the frames (context windows), a chunk's rows are the
window's frames, not frames 0..rows-1.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class BatchLayout(NamedTuple):
    uncond: tuple[bool, ...]               # per chunk: does it come from a non-positive conditioning?
    rows: int                              # latents per chunk
    frames: tuple[int, ...] | None = None  # the window's frame of each row; None: frames 0..rows-1

    @property
    def chunks(self) -> int:
        return len(self.uncond)

    def frame_of_rows(self) -> tuple[int, ...]:
        """The frame of each row of one chunk."""
        return self.frames or tuple(range(self.rows))


def layout_of(options: dict, batch: int, uncond_chunks: Callable[[dict], tuple[bool, ...]],
              window_frames: Callable[[dict, int], tuple[int, ...] | None]) -> BatchLayout:
    """How one model call's ``batch`` rows split into conditioning chunks (``uncond_chunks(options)``: per chunk,
    whether it is negative-side) and the frames of a window (``window_frames(options, rows)``, or None)."""
    flags = uncond_chunks(options)
    rows = batch // len(flags)
    return BatchLayout(flags, rows, window_frames(options, rows))


class DeviceIndices:
    """Index tensors on a device, each made once per key: copying a fresh one to a GPU on every call would
    wait for the GPU (a host sync)."""

    def __init__(self):
        self._made: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, device: torch.device, values: Callable[[], list[int]]) -> torch.Tensor:
        """The tensor of ``values()`` on ``device`` for ``key`` (a tuple naming what the values depend on)."""
        if (key, device) not in self._made:
            self._made[(key, device)] = torch.tensor(values(), device=device)
        return self._made[(key, device)]
