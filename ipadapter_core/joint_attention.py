"""InstantX's SD3.5 image attention: one softmax over a joint block's own keys and the image keys.

Per step, the adapter's time-conditioned resampler turns the reference's SigLIP hidden states into tokens [B, T, D]
and a time embedding temb [B, 1280]. In joint block i, as InstantX trained it (and as diffusers'
SD3IPAdapterJointAttnProcessor2_0 computes it):

    ip = LayerNorm(tokens) * (1 + scale_i) + shift_i,     (shift_i, scale_i) = Linear_i(SiLU(temb))
    x_attn += w_i * Attn(RMS_q,i(q), [RMS_k,i(k) ; RMS_ip,i(ip W_k,i)], [v ; ip W_v,i])

where q, k, v [B, N, D] are the block's own image-stream projections (q and k before its norms), and x_attn the image
stream's joint-attention output, before the block's output projection, gate and MLP. The block's q/k norms are
RMS norms, so the adapter's norm of q is the block's normed q times (adapter weight / block weight), per channel.
A mask multiplies an adapter's term on its region of the image stream's token grid, and a sigma range gates it, as
on a UNet (``image_factor``). Batch rows get cond or uncond embeds and their frame's image as the UNet's K/V do
(``batch_layout``); the resampler runs once per step and distinct row. The host glue: ``nodes/patch/sd35.py``.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter_spec import check_image_weights
from .batch_layout import BatchLayout
from .image_factor import ImageFactor, LayerGrid

NORM_EPS = 1e-6


def on(x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on ``device`` in ``dtype``: itself where it is (no operator dispatched), else a copy."""
    return x if x.device == torch.device(device) and x.dtype == dtype else x.to(device, dtype)


@dataclass(frozen=True)
class TimeConditionedSpec:
    """One SD3.5 adapter on one model: the references' hidden states (cond / uncond, [n, N, E]: n = 1 for every
    latent alike, else latent (frame) f of each chunk gets image f mod n), the resampler, the per-block weights of
    the file (``blocks[i]``: the ``{i}.*`` tensors without the prefix), a weight per block (0 skips it), the sigma
    range (high, low) or None, a mask [F, H, W] in [0, 1] or None and a weight per image (n values, or empty for
    all 1), as in ``AdapterSpec``."""
    cond_embeds: torch.Tensor
    uncond_embeds: torch.Tensor
    resampler: torch.nn.Module
    blocks: tuple[dict[str, torch.Tensor], ...]
    layer_weights: tuple[float, ...]
    sigma_range: tuple[float, float] | None = None
    mask: torch.Tensor | None = None
    image_weights: tuple[float, ...] = ()

    def __post_init__(self):
        check_image_weights(self.image_weights, self.cond_embeds.shape[0])


class JointAdapterWeights(torch.nn.Module):
    """One SD3.5 adapter's weights as one module, for the host's memory manager to load and offload beside the model:
    a copy of the resampler (fp32, as the tokens are computed; the loaded adapter stays where it is, for other models)
    and each block's tensors in the model's compute ``dtype``."""

    def __init__(self, spec: TimeConditionedSpec, dtype: torch.dtype):
        super().__init__()
        self.resampler = copy.deepcopy(spec.resampler).float().requires_grad_(False)
        self.names = tuple(tuple(block) for block in spec.blocks)
        for index, block in enumerate(spec.blocks):
            for name, tensor in block.items():
                self.register_parameter(self.attribute(index, name),
                                        torch.nn.Parameter(tensor.to(dtype), requires_grad=False))

    @staticmethod
    def attribute(index: int, name: str) -> str:
        return f"block{index}_{name.replace('.', '_')}"

    def block(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors by their names in the file (``to_k_ip.weight``, ...), where the host put them."""
        return {name: getattr(self, self.attribute(index, name)) for name in self.names[index]}


class JointImageTerms:
    """The image terms of one patched MMDiT's adapters (see the module docstring), with what they make once per run.

    ``timestep(sigmas)`` is the model's timestep of a step's sigma (what the resampler is conditioned on);
    ``weights`` each adapter's ``JointAdapterWeights``, used on whatever device they are (the host's memory manager
    loads them with the model; elsewhere the tensors are copied per call)."""

    def __init__(self, adapters: tuple[TimeConditionedSpec, ...], timestep,
                 weights: tuple[JointAdapterWeights, ...]):
        self.adapters = adapters
        self.timestep = timestep
        self.weights = weights
        self.factors = ImageFactor(adapters)
        self._step = threading.local()  # per thread (concurrent calls on several devices): this step's tokens
        self._ratios: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._made: dict[tuple, object] = {}  # made once: rows and row weights by layout

    def tokens(self, index: int, layout: BatchLayout, sigmas: torch.Tensor, device, dtype):
        """Adapter ``index``'s (tokens [B, T, D], temb [B, W]) at this step: computed at the first block, reused;
        the resampler runs once per distinct reference row (cond and uncond of each image), not per batch row."""
        step_sigmas, step_layout, cache = getattr(self._step, "tokens", (None, None, {}))
        if sigmas is not step_sigmas or layout != step_layout:
            cache = {}
            self._step.tokens = (sigmas, layout, cache)
        if index not in cache:
            distinct, pick = self.rows(index, layout, device)
            t = self.timestep(sigmas[:1]).float().expand(distinct.shape[0])
            resampler = self.weights[index].resampler
            where = next(resampler.parameters()).device
            with torch.no_grad():
                tokens, temb = (on(x, device, x.dtype) for x in resampler(on(distinct, where, distinct.dtype),
                                                                          on(t, where, t.dtype)))
            if pick is not None:
                tokens, temb = tokens.index_select(0, pick), temb.index_select(0, pick)
            cache[index] = (tokens.to(dtype), temb.to(dtype))
        return cache[index]

    def rows(self, index: int, layout: BatchLayout, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The distinct hidden states [U, N, E] the batch rows need (uncond or cond by a row's chunk, the image of
        its frame), on ``device`` in fp32, and which of them each batch row takes ([B], None when row i takes i):
        made once per layout."""
        key = ("rows", index, layout, device)
        if key not in self._made:
            spec = self.adapters[index]
            wanted = [(uncond, f % spec.cond_embeds.shape[0]) for uncond in layout.uncond
                      for f in layout.frame_of_rows()]
            distinct = list(dict.fromkeys(wanted))
            embeds = torch.stack([(spec.uncond_embeds if uncond else spec.cond_embeds)[image]
                                  for uncond, image in distinct]).to(device, torch.float32)
            pick = [distinct.index(row) for row in wanted]
            self._made[key] = (embeds, None if pick == list(range(len(pick))) else
                                     torch.tensor(pick, device=device))
        return self._made[key]

    def image_weights(self, index: int, layout: BatchLayout, device, dtype) -> torch.Tensor | None:
        """Each batch row's image weight, [B, 1, 1] (made once per layout), or None without image weights."""
        spec = self.adapters[index]
        if not spec.image_weights:
            return None
        key = ("weights", index, layout, device, dtype)
        if key not in self._made:
            n = len(spec.image_weights)
            weights = [spec.image_weights[f % n] for _ in layout.uncond for f in layout.frame_of_rows()]
            self._made[key] = torch.tensor(weights, device=device, dtype=dtype)[:, None, None]
        return self._made[key]

    def norm_ratios(self, block_norms: tuple[torch.Tensor, torch.Tensor], index: int, block_index: int,
                    weights: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter norm_q / block q norm, adapter norm_k / block k norm) weights, [head_dim] each: adapter
        ``index``'s at ``block_index``, made once per block norm (the model that runs), device and dtype."""
        key = (id(block_norms[0]), index, block_index, device, dtype)
        if key not in self._ratios:
            self._ratios[key] = tuple(weights[name] / norm.to(device, dtype)
                                      for name, norm in zip(("norm_q.weight", "norm_k.weight"), block_norms))
        return self._ratios[key]

    def factor(self, index: int, layout: BatchLayout, sigmas: torch.Tensor, tokens: int,
               token_grid: tuple[int, int] | None, device, dtype):
        """Adapter ``index``'s mask on this call's ``token_grid`` (h, w) times its sigma gate, [B or 1, tokens or 1,
        1]; or None when it has neither."""
        if not self.factors.applies((index,)):
            return None
        grid = LayerGrid((index,), tokens, token_grid, device, dtype)
        return self.factors.factor(grid, layout, sigmas)[:, 0]

    def image_term(self, block_index: int, x_qkv, heads: int, block_norms: tuple[torch.Tensor, torch.Tensor],
                   layout: BatchLayout, sigmas: torch.Tensor,
                   token_grid: tuple[int, int] | None) -> torch.Tensor | None:
        """Every adapter's term for the image stream of joint block ``block_index`` ([B, N, D]), or None: ``x_qkv``
        the block's image-stream q, k, v [B, N, D] (q and k before its norms), ``block_norms`` the weights of its
        q and k RMS norms [D / heads], ``token_grid`` the image stream's (h, w) (for masks)."""
        q, k, v = x_qkv
        b, n, d = q.shape
        total = None
        for index, spec in enumerate(self.adapters):
            weight = spec.layer_weights[block_index]
            if weight == 0:
                continue
            p = {name: on(x, q.device, q.dtype) for name, x in self.weights[index].block(block_index).items()}
            tokens, temb = self.tokens(index, layout, sigmas, q.device, q.dtype)
            shift, scale = F.linear(F.silu(temb), p["norm_ip.linear.weight"], p["norm_ip.linear.bias"]).chunk(2, dim=-1)
            ip = F.layer_norm(tokens, (tokens.shape[-1],), eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
            ip_k = F.rms_norm(F.linear(ip, p["to_k_ip.weight"]).unflatten(-1, (heads, -1)), (d // heads,),
                              p["norm_ip_k.weight"], NORM_EPS)
            ip_v = F.linear(ip, p["to_v_ip.weight"]).unflatten(-1, (heads, -1))
            q_ratio, k_ratio = self.norm_ratios(block_norms, index, block_index, p, q.device, q.dtype)
            queries = (q.unflatten(-1, (heads, -1)) * q_ratio).transpose(1, 2)
            keys = torch.cat([k.unflatten(-1, (heads, -1)) * k_ratio, ip_k], dim=1).transpose(1, 2)
            values = torch.cat([v.reshape(b, n, heads, -1), ip_v], dim=1).transpose(1, 2)  # v comes per head
            term = F.scaled_dot_product_attention(queries, keys, values).transpose(1, 2).reshape(b, n, d)
            term = term * weight
            for factor in (self.image_weights(index, layout, q.device, q.dtype),
                           self.factor(index, layout, sigmas, n, token_grid, q.device, q.dtype)):
                if factor is not None:
                    term = term * factor
            total = term if total is None else total + term
        return total
