"""Strength, timing and mask per reference image on edit models that read references as tokens.

FLUX.1 Kontext, FLUX.2 and Qwen-Image-Edit append each reference latent's tokens after the output's image
tokens, and every attention runs over the joint sequence (length L)

    [ text (T) | output image (N = h·w tokens) | reference 1 (R1) | reference 2 (R2) | ... ]

A reference's strength s scales how much every other token attends to it: log s is added to the attention
logits of that reference's columns on all rows but its own, so each of its softmax weights there is multiplied by
s before the row is renormalised. s = 1 adds nothing (the model's own result). s = 0 adds −∞: those columns drop
out, and every other row is exactly that of the same call without the reference's tokens (its own rows still
run, but no other row reads them). Later references keep their places (RoPE positions), so for the last (or only)
reference this is the call without it; for an earlier one, the call without its tokens.

A mask m ∈ [0, 1] over the output's token grid makes the strength per row: the output token p gets s·m[p]; the
text rows and the other references' rows, which every region reads, get s·mean(m). So an all-ones mask is no
mask, and an all-zero mask (like a strength of 0, or a step outside the reference's sigma range) is no reference.
Nothing here knows ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one joint sequence: text, the output's token grid (h, w), and each reference."""
    text: int
    grid: tuple[int, int]
    references: tuple[int, ...]

    @property
    def first_reference(self) -> int:
        """Where the references start: after the text and the output's image tokens (T + N)."""
        return self.text + self.grid[0] * self.grid[1]

    @property
    def length(self) -> int:
        return self.first_reference + sum(self.references)

    def owner(self) -> torch.Tensor:
        """[L] the reference each token belongs to (0-based), −1 for text and output tokens."""
        counts = torch.tensor((self.first_reference, *self.references))
        return torch.repeat_interleave(torch.arange(-1, len(self.references)), counts)


def tokens_of(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """The token grid of a latent [.., H, W] cut into patch x patch tokens (edges padded, as the models do)."""
    return (-(-latent_hw[0] // patch), -(-latent_hw[1] // patch))


@dataclass(frozen=True)
class ReferenceControl:
    """One reference's controls: strength (≥ 0), sigma range (start ≥ sigma ≥ end), mask [H, W] or None."""
    strength: float = 1.0
    sigma_range: tuple[float, float] = (float("inf"), float("-inf"))
    mask: torch.Tensor | None = None


def row_scales(controls: tuple[ReferenceControl, ...], layout: TokenLayout) -> torch.Tensor:
    """Each row's strength for each reference: [L, R] (fp32, on the CPU); 1 on a reference's own rows.

    Output rows get s·m[p] with the mask resized (bilinear) to the token grid; the other rows s·mean(m)."""
    owner = layout.owner()
    grid_rows = slice(layout.text, layout.first_reference)
    scales = torch.ones(layout.length, len(controls))
    for r, control in enumerate(controls):
        if control.mask is None:
            scales[:, r] = control.strength
        else:
            grid = torch.nn.functional.interpolate(control.mask[None, None].float(), size=layout.grid, mode="bilinear")
            grid = grid.flatten().clamp(0.0, 1.0) * control.strength
            scales[:, r] = grid.mean()
            scales[grid_rows, r] = grid
        scales[owner == r, r] = 1.0
    return scales


class ReferenceBias:
    """The additive attention bias of one layout's references, [1, 1, L, L], built from ``row_scales`` on a device.

    ``at(gates)`` takes a [R] tensor of 0/1 (which references are inside their sigma range this step, computed
    on the device) and returns the bias with the gated-off references at −∞ on all rows but their own; no host
    sync. ``at(None)``: every reference on (built once)."""

    def __init__(self, scales: torch.Tensor, layout: TokenLayout, device: torch.device, dtype: torch.dtype):
        self.layout = layout
        self.dtype = dtype
        owner = layout.owner()
        self.scales = scales.to(device)
        self.own = (owner[:, None] == torch.arange(len(layout.references))).to(device)
        self.columns = owner[layout.first_reference:].to(device)
        self.always = self.build(None)

    def build(self, gates: torch.Tensor | None) -> torch.Tensor:
        scales = self.scales if gates is None else torch.where(self.own, 1.0, self.scales * gates)
        start = self.layout.first_reference
        bias = torch.zeros(1, 1, self.layout.length, self.layout.length, device=self.scales.device, dtype=self.dtype)
        bias[0, 0, :, start:] = torch.log(scales).index_select(1, self.columns)
        return bias

    def at(self, gates: torch.Tensor | None) -> torch.Tensor:
        return self.always if gates is None else self.build(gates)


def sigma_gates(sigma: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """[R] 1.0 where ranges[r, 0] ≥ sigma ≥ ranges[r, 1], else 0.0; ``sigma`` is the call's [B] timestep."""
    s = sigma.reshape(-1)[:1].to(ranges)
    return ((ranges[:, 0] >= s) & (s >= ranges[:, 1])).to(torch.float32)
