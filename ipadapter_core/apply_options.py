"""How one adapter applies to a model, from an apply node's inputs: made once, checked where it is made."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter_spec import check_kv_scaling
from .embeds import check_combine_mode
from .weights import check_weight_type

WHOLE_IMAGE = (1, 1.0)  # enhance (tiles per side, ratio) off: CLIP vision sees the whole image only


@dataclass(frozen=True)
class ApplyOptions:
    """The apply nodes' settings, named as their inputs. ``weight`` scales the image attention;
    ``image_weights`` (one per reference image, from a weight list) scale each image's term. ``layer_weights``
    ("index:weight, ...", per attention block) replaces ``weight_type`` when given. ``attn_mask`` [F, H, W]
    in 0..1. ``combine_embeds``, ``image_negative``, ``unfold_batch`` and ``enhance`` (tiles per side,
    ratio) say how the reference images are encoded."""
    weight: float = 1.0
    image_weights: tuple[float, ...] = ()
    weight_type: str = "linear"
    start_at: float = 0.0
    end_at: float = 1.0
    embeds_scaling: str = "V only"
    attn_mask: torch.Tensor | None = None
    composition_weight: float | None = None
    layer_weights: str = ""
    combine_embeds: str = "concat"
    image_negative: torch.Tensor | None = None
    unfold_batch: bool = False
    enhance: tuple[int, float] = WHOLE_IMAGE

    def __post_init__(self):
        if not 0.0 <= self.start_at < self.end_at <= 1.0:
            raise ValueError(f"start_at ({self.start_at}) must be below end_at ({self.end_at}), both within 0..1")
        check_weight_type(self.weight_type)
        check_kv_scaling(self.embeds_scaling)
        check_combine_mode(self.combine_embeds)
        if self.attn_mask is not None and (self.attn_mask.ndim != 3 or 0 in self.attn_mask.shape):
            raise ValueError(f"attn_mask: expected a MASK [frames, H, W], got shape {tuple(self.attn_mask.shape)}")

    @classmethod
    def from_inputs(cls, weight: float | list[float] = 1.0, attn_mask: torch.Tensor | None = None,
                    **inputs) -> "ApplyOptions":
        """From an apply node's inputs: ``weight`` a number, or a list of per-image weights (from Frame
        Weights); ``attn_mask`` a MASK [H, W] or [frames, H, W] of any value range."""
        image_weights = ()
        if isinstance(weight, (list, tuple)):
            image_weights = tuple(float(w) for w in weight)
            if not image_weights or not all(math.isfinite(w) for w in image_weights):
                raise ValueError(f"weight: expected a number or a non-empty list of finite numbers, got {weight!r}")
            weight = 1.0
        if attn_mask is not None:
            if attn_mask.ndim not in (2, 3) or 0 in attn_mask.shape:
                raise ValueError(f"attn_mask: expected a MASK [frames, H, W], got shape {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-2:]).float().clamp(0, 1)
        return cls(float(weight), image_weights, attn_mask=attn_mask, **inputs)
