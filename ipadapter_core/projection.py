"""IP-Adapter image projections: CLIP image embeddings or face embeddings -> image tokens.

One module per ``image_proj`` layout (shared/reference/ip_adapter.md §2.2). Parameter names equal the
checkpoint keys, so ``build_projection`` loads a file's ``image_proj`` strictly without renaming;
every size (tokens, widths, heads, depth) is read from the tensor shapes.

Shapes: B batch, N input tokens, E input width, T image tokens, D token width, W perceiver width.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from .variants import Variant

DIM_HEAD = 64  # channels per attention head in every public perceiver


class LinearProjection(nn.Module):
    """ImageProjModel: pooled image_embeds, one Linear to T tokens, LayerNorm per token."""

    def __init__(self, embed_dim: int, tokens: int, dim: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, E] -> [B, T, D]"""
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.tokens, -1))


class TokenMLP(nn.Module):
    """MLPProjModel (full-face): Linear, GELU, Linear, LayerNorm applied to every hidden-state token."""

    def __init__(self, embed_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, dim),
                                  nn.LayerNorm(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, N, E] -> [B, N, D]"""
        return self.proj(hidden.to(self.proj[0].weight.dtype))


class FaceMLP(nn.Module):
    """MLPProjModelFaceId (FaceID, portrait): face vector -> Linear, GELU, Linear to T tokens, LayerNorm."""

    def __init__(self, embed_dim: int, hidden_dim: int, tokens: int, dim: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, tokens * dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """face [B, 512] -> [B, T, D]"""
        x = self.proj(face.to(self.proj[0].weight.dtype))
        return self.norm(x.reshape(face.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """Latents query [norm1(features) ; norm2(latents)]; heads of 64 channels, no biases."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.heads = inner // DIM_HEAD
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """features [B, N, W], latents [B, T, W] -> update of the latents [B, T, W]; ``modulation`` (shift, scale)
        [B, W] modulates the normed latents (the time-conditioned resampler)."""
        features, latents = self.norm1(features), self.norm2(latents)
        if modulation is not None:
            latents = modulate(latents, *modulation)
        b, t, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (x.reshape(b, x.shape[1], self.heads, DIM_HEAD).transpose(1, 2) for x in (q, k, v))
        scale = DIM_HEAD ** -0.25  # split between q and k, as the reference Resampler does
        scores = (q.float() * scale) @ (k.float() * scale).transpose(-2, -1)  # [B, heads, T, N+T], float32
        out = scores.softmax(dim=-1).to(v.dtype) @ v  # [B, heads, T, 64]
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm's affine part: x [B, T, W] * (1 + scale) + shift, with shift, scale [B, W]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def feed_forward(width: int, hidden: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (no biases): keys .0, .1, .3."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden, bias=False), nn.GELU(),
                         nn.Linear(hidden, width, bias=False))


class Perceiver(nn.Module):
    """proj_in, depth x (attention + residual, feed-forward + residual), proj_out, norm_out."""

    def __init__(self, embed_dim: int, width: int, inner: int, ff_dim: int, depth: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, width)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(width, inner), feed_forward(width, ff_dim)])
                                    for _ in range(depth))
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features [B, N, E], latents [B, T, W] -> [B, T, D]"""
        x = self.proj_in(features.to(self.proj_in.weight.dtype))
        for attention, ff in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class Resampler(Perceiver):
    """IP-Adapter Plus (and Kolors plus, portrait-unnorm): learned latents [1, T, W] are the queries."""

    def __init__(self, tokens: int, **sizes: int):
        super().__init__(**sizes)
        self.latents = nn.Parameter(torch.empty(1, tokens, sizes["width"]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, N, E] -> [B, T, D]; a face vector [B, 512] (portrait-unnorm) is a 1-token sequence."""
        if hidden.dim() == 2:
            hidden = hidden[:, None]
        return super().forward(hidden, self.latents.expand(hidden.shape[0], -1, -1))


class TimestepMLP(nn.Module):
    """Sinusoidal embedding of the timestep t (cos first, periods up to 10000) -> Linear, SiLU, Linear."""

    def __init__(self, frequencies: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(frequencies, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (0..1000) -> [B, W]"""
        half = self.linear_1.in_features // 2
        rates = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * rates[None]
        waves = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(waves)))


class TimeResampler(nn.Module):
    """InstantX's SD3.5 resampler: a perceiver whose latents are modulated by the timestep at every layer.

    temb = TimestepMLP(t); x = proj_in(hidden) + temb; per layer, (shift, scale) pairs from Linear(SiLU(temb))
    modulate the normed latents before the attention and before the feed-forward; out = norm_out(proj_out(latents)).
    Runs at every step (its output depends on t); returns the tokens and temb (the joint blocks' AdaLN reads it)."""

    def __init__(self, tokens: int, embed_dim: int, width: int, inner: int, ff_dim: int, depth: int, out_dim: int,
                 frequencies: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, tokens, width))
        self.proj_in = nn.Linear(embed_dim, width)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(width, inner), feed_forward(width, ff_dim),
                                                   nn.Sequential(nn.SiLU(), nn.Linear(width, 4 * width))])
                                    for _ in range(depth))
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.time_embedding = TimestepMLP(frequencies, width)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, N, E], t [B] -> (tokens [B, T, D], temb [B, W])"""
        temb = self.time_embedding(t)
        x = self.proj_in(hidden.to(self.proj_in.weight.dtype)) + temb[:, None]
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        for attention, ff, ada in self.layers:
            shift_attn, scale_attn, shift_ff, scale_ff = ada(temb).chunk(4, dim=-1)
            latents = latents + attention(x, latents, (shift_attn, scale_attn))
            latents = latents + ff[1:](modulate(ff[0](latents), shift_ff, scale_ff))
        return self.norm_out(self.proj_out(latents)), temb


class FaceIDPlus(FaceMLP):
    """ProjModelFaceIdPlus: the face MLP's id tokens are the latents of a perceiver over CLIP hidden states."""

    def __init__(self, shortcut: bool, perceiver: dict[str, int], **face_sizes: int):
        super().__init__(**face_sizes)
        self.shortcut = shortcut
        self.perceiver_resampler = Perceiver(**perceiver)

    def forward(self, face: torch.Tensor, clip_hidden: torch.Tensor, shortcut_scale: float = 1.0) -> torch.Tensor:
        """face [B, 512], clip_hidden [B, N, E_clip] -> [B, T, D]; with the v2 shortcut,
        id tokens + shortcut_scale * perceiver output."""
        ids = super().forward(face)
        out = self.perceiver_resampler(clip_hidden, ids)
        return ids + shortcut_scale * out if self.shortcut else out


def _shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"image_proj is missing {key!r}")
    return tuple(sd[key].shape)


def _perceiver_sizes(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, int]:
    width, embed_dim = _shape(sd, prefix + "proj_in.weight")
    inner = _shape(sd, prefix + "layers.0.0.to_q.weight")[0]
    if inner % DIM_HEAD:
        raise ValueError(f"image_proj[{prefix + 'layers.0.0.to_q.weight'!r}] has {inner} rows, "
                         f"not a multiple of {DIM_HEAD} channels per head")
    layer = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    depth = 1 + max(int(m[1]) for m in map(layer.match, sd) if m)
    return dict(embed_dim=embed_dim, width=width, inner=inner, ff_dim=_shape(sd, prefix + "layers.0.1.1.weight")[0],
                depth=depth, out_dim=_shape(sd, prefix + "proj_out.weight")[0])


def _face_sizes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    hidden_dim, embed_dim = _shape(sd, "proj.0.weight")
    dim = _shape(sd, "norm.weight")[0]
    return dict(embed_dim=embed_dim, hidden_dim=hidden_dim, tokens=_shape(sd, "proj.2.weight")[0] // dim, dim=dim)


def _construct(variant: Variant, sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, int]:
    """(module with empty weights, its input width, its token count) for the variant's projection kind."""
    kind = variant.projection
    if kind == "linear":
        dim = _shape(sd, "norm.weight")[0]
        rows, embed_dim = _shape(sd, "proj.weight")
        return LinearProjection(embed_dim, rows // dim, dim), embed_dim, rows // dim
    if kind == "mlp":
        embed_dim = _shape(sd, "proj.0.weight")[1]
        return TokenMLP(embed_dim, _shape(sd, "proj.3.weight")[0]), embed_dim, variant.tokens
    if kind == "resampler":
        tokens = _shape(sd, "latents")[1]
        sizes = _perceiver_sizes(sd)
        return Resampler(tokens, **sizes), sizes["embed_dim"], tokens
    if kind == "faceid":
        sizes = _face_sizes(sd)
        return FaceMLP(**sizes), sizes["embed_dim"], sizes["tokens"]
    if kind == "faceid_plus":
        sizes = _face_sizes(sd)
        module = FaceIDPlus(variant.shortcut, _perceiver_sizes(sd, "perceiver_resampler."), **sizes)
        return module, sizes["embed_dim"], sizes["tokens"]
    if kind == "time_resampler":
        tokens, sizes = _shape(sd, "latents")[1], _perceiver_sizes(sd)
        frequencies = _shape(sd, "time_embedding.linear_1.weight")[1]
        return TimeResampler(tokens, frequencies=frequencies, **sizes), sizes["embed_dim"], tokens
    raise ValueError(f"unknown projection kind {kind!r}")


def build_projection(variant: Variant, image_proj: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The variant's projection module holding copies of the ``image_proj`` tensors, in eval mode.

    Raises ValueError naming the key when a tensor is missing, unexpected or of the wrong shape, or when
    the weights do not fit the variant's input width or token count.
    """
    try:
        with torch.device("meta"):
            module, embed_dim, tokens = _construct(variant, image_proj)
    except ValueError as err:
        raise ValueError(f"{variant.name}: {err}") from None
    if (embed_dim, tokens) != (variant.embed_dim, variant.tokens):
        raise ValueError(f"{variant.name}: image_proj takes width {embed_dim} to {tokens} tokens; "
                         f"the variant expects width {variant.embed_dim} to {variant.tokens} tokens")
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - image_proj.keys()), sorted(image_proj.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{variant.name}: image_proj keys do not match the {type(module).__name__} layout; "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, param in expected.items():
        if image_proj[key].shape != param.shape:
            raise ValueError(f"{variant.name}: image_proj[{key!r}] has shape {tuple(image_proj[key].shape)}, "
                             f"expected {tuple(param.shape)} from the other weights")
    weights = {k: image_proj[k].to(device, dtype, copy=True, memory_format=torch.contiguous_format) for k in expected}
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval().requires_grad_(False)
