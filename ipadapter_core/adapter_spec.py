"""One adapter on one model, as the patch reads it: image tokens, per-layer K/V weights, weights and limits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .choices import check_choice

KV_SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
K_NORM_EPS = 1e-5  # InstantX's RMS norm of the image keys
PENALTY_WIDTH = 1280  # the C penalty scales a layer's weight by C / 1280: shallow layers are damped


def check_kv_scaling(kv_scaling: str) -> None:
    check_choice("embeds_scaling", kv_scaling, KV_SCALINGS)


def check_image_weights(image_weights: tuple[float, ...], images: int) -> None:
    """ValueError unless there are no image weights or one per image."""
    if image_weights and len(image_weights) != images:
        raise ValueError(f"weight: {len(image_weights)} weights for {images} images; give one weight, or one per image")


def scaled_kv(k: torch.Tensor, v: torch.Tensor, weight: float | torch.Tensor, kv_scaling: str):
    """Image K and V [n, T, C] with the weight folded in where ``kv_scaling`` puts it: V only (the output is
    linear in V), K and V, either with the C penalty (weight x C / 1280), or K and the token mean of V."""
    if kv_scaling == "V only":
        return k, v * weight
    if kv_scaling != "K+V":
        weight = weight * k.shape[-1] / PENALTY_WIDTH
    if kv_scaling == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=1, keepdim=True)
        return k * weight, v - mean + mean * weight
    return k * weight, v * weight


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter on one model: image tokens, per-layer K/V weights and weights, and how they apply.

    ``cond_tokens`` / ``uncond_tokens`` [n, T, D]: n = 1 conditions every latent alike; n > 1 (unfolded
    batch) gives image i to latent i of each chunk (cycling when the batch is longer). ``image_weights``
    (n values, or empty for all 1) scale each image's term. ``to_k[i]`` / ``to_v[i]`` [C_i, D] for layer
    i; ``layer_weights[i]`` scales the image term at layer i (0 skips the layer); ``swapped[i]`` gives
    the image to the uncond side and zeros to the cond side (the precise weight types). ``kv_scaling``
    is where the weight applies (see ``scaled_kv``). ``sigma_range`` (high, low) limits the adapter to
    low <= sigma <= high. ``mask`` [F, H, W] in [0, 1] limits it to a region of the image, at any aspect
    ratio: mask f on latent (frame) f of each chunk, the last mask on the frames after it. ``k_bias[i]`` /
    ``v_bias[i]`` [C_i] are the K/V projections' biases where the adapter has them (XLabs' Flux adapters).
    ``k_norm_head_dim`` > 0 RMS-normalises each head's slice of K (that many channels, eps 1e-5, no scale) before
    the weights apply (InstantX's Flux adapter)."""
    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    to_k: tuple[torch.Tensor, ...]
    to_v: tuple[torch.Tensor, ...]
    layer_weights: tuple[float, ...]
    swapped: tuple[bool, ...] = ()
    kv_scaling: str = "V only"
    sigma_range: tuple[float, float] | None = None
    mask: torch.Tensor | None = None
    image_weights: tuple[float, ...] = ()
    k_bias: tuple[torch.Tensor, ...] = ()
    v_bias: tuple[torch.Tensor, ...] = ()
    k_norm_head_dim: int = 0
    _kv_cache: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        check_kv_scaling(self.kv_scaling)
        check_image_weights(self.image_weights, self.images)

    @property
    def images(self) -> int:
        """n: the images of an unfolded batch (1 when every latent sees the same tokens)."""
        return self.cond_tokens.shape[0]

    @property
    def tokens(self) -> int:
        """T: image tokens per image."""
        return self.cond_tokens.shape[1]

    def image_kv(self, layer: int, device: torch.device, dtype: torch.dtype):
        """(K [2n, T, C], V [2n, T, C]) at ``layer``: rows 0..n-1 for uncond chunks, n..2n-1 for cond chunks,
        with the weights folded in. Computed once."""
        key = (layer, device, dtype)
        if key not in self._kv_cache:
            cond, uncond = self.cond_tokens, self.uncond_tokens
            if self.swapped and self.swapped[layer]:
                cond, uncond = torch.zeros_like(cond), cond
            tokens = torch.cat([uncond, cond]).to(device, torch.float32)
            k = tokens @ self.to_k[layer].to(device, torch.float32).T
            v = tokens @ self.to_v[layer].to(device, torch.float32).T
            if self.k_bias:
                k, v = k + self.k_bias[layer].to(device, torch.float32), v + self.v_bias[layer].to(device, torch.float32)
            if self.k_norm_head_dim:
                head = self.k_norm_head_dim
                k = torch.nn.functional.rms_norm(k.unflatten(-1, (-1, head)), (head,), eps=K_NORM_EPS).flatten(-2)
            weight = self.layer_weights[layer]
            if self.image_weights:  # [2n, 1, 1]: image i's weight on its uncond and cond rows
                weight = weight * torch.tensor(self.image_weights, device=device).repeat(2)[:, None, None]
            k, v = scaled_kv(k, v, weight, self.kv_scaling)
            self._kv_cache[key] = (k.to(dtype), v.to(dtype))
        return self._kv_cache[key]
