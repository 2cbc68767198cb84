"""The image K/V of a token group laid out like the sampler's batch, for an attention form, made once per layout.

Uncond chunks get each adapter's uncond tokens, the others its cond tokens; row r of a chunk gets image
r mod n of an unfolded batch of n images, or, when the UNet runs on a window of the frames, the image of
the row's frame (read from K/V laid out once for one cycle of the images, with one cached row index).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .adapter_spec import AdapterSpec
from .attention_forms import KV, AttentionForm
from .batch_layout import BatchLayout, DeviceIndices


class LayoutKey(NamedTuple):
    group: tuple[int, ...]
    layer: int
    uncond: tuple[bool, ...]
    rows: int
    heads: int
    device: torch.device
    dtype: torch.dtype


class BatchedImageKV:
    """The K/V of one patch's adapters, cached per ``LayoutKey`` (and per form's arrangement)."""

    def __init__(self, adapters: tuple[AdapterSpec, ...]):
        self.adapters = adapters
        self._head_major: dict[LayoutKey, KV] = {}
        self._arranged: dict[tuple[AttentionForm, LayoutKey], KV] = {}
        self._periods: dict[tuple[int, ...], int] = {}
        self._window_rows = DeviceIndices()

    def for_form(self, form: AttentionForm, group: tuple[int, ...], layer: int, layout: BatchLayout, heads: int,
                 device: torch.device, dtype: torch.dtype) -> KV:
        """``group``'s K/V for a batch of ``layout``, arranged for ``form`` (``AttentionForm.lay_out``)."""
        period = self.period(group)
        if layout.frames is None or period == 1:
            return self._arranged_kv(form, LayoutKey(group, layer, layout.uncond, layout.rows, heads, device, dtype))
        # a window of an unfolded batch: the rows of the window's frames, from one cycle of the images
        kv = self._arranged_kv(form, LayoutKey(group, layer, layout.uncond, period, heads, device, dtype))
        pick = self._window_rows.get((layout.chunks, period, layout.frames), device, lambda: [
            c * period + f % period for c in range(layout.chunks) for f in layout.frames])
        return tuple(x.index_select(0, pick) for x in kv)

    def period(self, group: tuple[int, ...]) -> int:
        """After how many frames the images of ``group``'s adapters repeat together (1: none is unfolded)."""
        if group not in self._periods:
            self._periods[group] = math.lcm(*(self.adapters[i].images for i in group))
        return self._periods[group]

    def _arranged_kv(self, form: AttentionForm, key: LayoutKey) -> KV:
        if (form, key) not in self._arranged:
            self._arranged[(form, key)] = form.lay_out(*self._head_major_kv(key), len(key.group))
        return self._arranged[(form, key)]

    def _head_major_kv(self, key: LayoutKey) -> KV:
        """[B, A*H, T, d], adapter by adapter (cat copies: contiguous)."""
        if key not in self._head_major:
            keys, values = [], []
            for index in key.group:
                adapter = self.adapters[index]
                k_pair, v_pair = adapter.image_kv(key.layer, key.device, key.dtype)
                n = adapter.images
                pick = torch.tensor([(0 if uncond else n) + r % n for uncond in key.uncond for r in range(key.rows)],
                                    device=key.device)
                for x, found in ((k_pair, keys), (v_pair, values)):
                    x = x.index_select(0, pick)
                    found.append(x.view(x.shape[0], x.shape[1], key.heads, -1).transpose(1, 2))
            self._head_major[key] = (torch.cat(keys, dim=1), torch.cat(values, dim=1))
        return self._head_major[key]
