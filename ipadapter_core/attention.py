"""Decoupled cross-attention (IP-Adapter, arXiv 2308.06721, eq. 5), as one replacement per cross-attention layer.

    Z = Attn(Q, K_text, V_text) + sum_a w_a[layer] * Attn(Q, K_a, V_a),   K_a = c_a W'_k,a,  V_a = c_a W'_v,a

Q, K_text and V_text arrive already projected by the frozen layer ([B, N, C] and [B, 77, C]); the result goes
to the layer's own ``to_out``. The image keys and values of each adapter are computed once per layer, device
and dtype (weights folded in) and then reused at every step; adapters with the same number of image tokens
attend together (one call, or one product). Which image tokens a batch chunk gets (cond or uncond) is decided
by the conditioning that produced the chunk, never by its position; which image an unfolded batch gives a latent,
by the latent's frame index, also when the sampler runs the UNet on a window of the frames (context windows).

How the image attention runs is chosen per device (``attention_form``). On a GPU, where a step is bound by
kernel launches, it is one SDPA call for all adapters of a group (as extra heads) and one add. On the CPU,
where it is bound by arithmetic, torch's SDPA vectorizes along the keys, so with 4 or 16 image keys most of
each vector idles: there a few keys take two matrix products batched over the heads, with the softmax along
the keys (16 keys) or, for fewer keys than a vector holds, along the queries (4 keys), and many keys take
SDPA per adapter. bench/attention_forms.py times each form. Also only on the CPU, where reading a tensor back
costs no GPU sync: adapters outside their sigma range are skipped, and a mask over a small part of a layer
limits its attention to the rows the mask covers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# attention(q [B, N, C], k [B, M, C], v [B, M, C], heads, **options) -> [B, N, C]
AttentionFn = Callable[..., torch.Tensor]
LayerKey = tuple[str, int, int]  # (block name, block id, depth index in its transformer)


KV_SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
PENALTY_WIDTH = 1280  # the C penalty scales a layer's weight by C / 1280: shallow layers are damped
KEY_MAJOR_BELOW_TOKENS = 8  # an AVX2 vector's floats: fewer keys softmax faster along the queries (3x at 4 keys)
HEAD_PRODUCTS_MAX_TOKENS = 64  # products and SDPA are even at 64 tokens; at 257 SDPA is 1.3-3x faster
# On the CPU, masks covering at most this share of a layer's rows run on those rows only. At half the rows this
# took 0.5-0.7x the time with 16 or 257 image tokens (even with 4); at three quarters, 1.1-1.8x with 4 or 16.
MASKED_ROWS_MAX_SHARE = 0.5
PRODUCTS = ("key-major products", "head products")  # the CPU's forms for a few tokens: two matrix products
FORMS = ("extra heads", "per adapter", *PRODUCTS)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter on one model: image tokens, per-layer K/V weights and weights, and how they apply.

    ``cond_tokens`` / ``uncond_tokens`` [n, T, D]: n = 1 conditions every latent alike; n > 1 (unfolded
    batch) gives image i to latent i of each chunk (cycling when the batch is longer). ``image_weights``
    (n values, or empty for all 1) scale each image's term. ``to_k[i]`` / ``to_v[i]`` [C_i, D] for layer
    i; ``layer_weights[i]`` scales the image term at layer i (0 skips the layer); ``swapped[i]`` gives
    the image to the uncond side and zeros to the cond side (the precise weight types). ``kv_scaling``
    is where the weight applies: to the output ("V only"), to K and V, with the C penalty, or to K and
    the token mean of V. ``sigma_range`` (high, low) limits the adapter to low <= sigma <= high.
    ``mask`` [F, H, W] in [0, 1] limits it to a region of the image, at any aspect ratio: mask f on latent
    (frame) f of each chunk, the last mask on the frames after it."""
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
    _kv_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.kv_scaling not in KV_SCALINGS:
            raise ValueError(f"embeds_scaling: '{self.kv_scaling}' is not one of {', '.join(KV_SCALINGS)}")
        if self.image_weights and len(self.image_weights) != self.cond_tokens.shape[0]:
            raise ValueError(f"weight: {len(self.image_weights)} weights for {self.cond_tokens.shape[0]} images; "
                             f"give one weight, or one per image")

    def image_kv(self, layer: int, device: torch.device, dtype: torch.dtype):
        """(K [2n, T, C], V [2n, T, C]) at ``layer``: rows 0..n-1 for uncond chunks, n..2n-1 for cond chunks,
        with the weights folded in (the output is linear in V, so "V only" scales V). Computed once."""
        key = (layer, device, dtype)
        if key not in self._kv_cache:
            cond, uncond = self.cond_tokens, self.uncond_tokens
            if self.swapped and self.swapped[layer]:
                cond, uncond = torch.zeros_like(cond), cond
            tokens = torch.cat([uncond, cond]).to(device, torch.float32)
            k = tokens @ self.to_k[layer].to(device, torch.float32).T
            v = tokens @ self.to_v[layer].to(device, torch.float32).T
            weight = self.layer_weights[layer]
            if self.image_weights:  # [2n, 1, 1]: image i's weight on its uncond and cond rows
                weight = weight * torch.tensor(self.image_weights, device=device).repeat(2)[:, None, None]
            if self.kv_scaling == "V only":
                v = v * weight
            else:
                if self.kv_scaling != "K+V":
                    weight = weight * k.shape[-1] / PENALTY_WIDTH
                k = k * weight
                if self.kv_scaling == "K+mean(V) w/ C penalty":
                    mean = v.mean(dim=1, keepdim=True)
                    v = v - mean + mean * weight
                else:
                    v = v * weight
            self._kv_cache[key] = (k.to(dtype), v.to(dtype))
        return self._kv_cache[key]


def mask_grid(mask: torch.Tensor, tokens: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``mask`` [F, H, W] resized to the token grid of a layer with ``tokens`` positions: [F, tokens, 1].

    The grid is the latent size halved (rounding up, as the UNet's strided convolutions do) until it
    has ``tokens`` positions, so any aspect ratio maps exactly."""
    h, w = latent_hw
    while h * w > tokens and h * w > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"attn_mask: no token grid of {tokens} positions fits a latent of {latent_hw[0]}x{latent_hw[1]}")
    grid = torch.nn.functional.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear")
    return grid.reshape(mask.shape[0], tokens, 1)


def attention_form(device: torch.device, tokens: int, heads: int, upcast: bool) -> str:
    """One of ``FORMS``, for adapters with ``tokens`` image tokens on a layer with ``heads`` heads: on a GPU
    "extra heads"; on the CPU products for a few tokens, else "per adapter" (repeating the query for extra
    heads costs more there than the calls it saves); of the products, "key-major" for fewer keys than a vector
    holds. With fp32 upcast, SDPA."""
    if device.type != "cpu":
        return "extra heads"
    if upcast or tokens > HEAD_PRODUCTS_MAX_TOKENS:
        return "per adapter"
    return "key-major products" if tokens < KEY_MAJOR_BELOW_TOKENS else "head products"


def head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] as a view [B, H, N, d]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def add_image_term(form: str, q: torch.Tensor, out: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                   factor: torch.Tensor | None, adapters: int, upcast: bool,
                   scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """out += sum_a factor_a * Attn(q, K_a, V_a) for one token group, in ``form``: ``q`` and ``out`` are head-major
    views [B, H, N, d]; ``kv`` is laid out for the form (``DecoupledCrossAttention._kv``); ``factor``
    [B or 1, A, N or 1, 1] or None. The product forms write scores and probabilities into ``scratch``, two flat
    buffers of H*A*T*N values."""
    b, heads, n, d = q.shape
    if form == "key-major products":
        tokens = kv[0].shape[2] // adapters
        scores, p = (x.view(heads, adapters, tokens, n) for x in scratch)
        for row in range(b):  # scores [H, A*T, N]: each adapter's softmax over T keys runs along N
            torch.bmm(kv[0][row], q[row].transpose(1, 2), out=scores.view(heads, -1, n))
            torch.softmax(scores, 2, out=p)
            if factor is not None:
                p.mul_(factor[row % len(factor)].transpose(1, 2))  # [A, 1, N or 1]
            out[row].baddbmm_(p.view(heads, -1, n).transpose(1, 2), kv[1][row])  # sums adapters together
    elif form == "head products":
        tokens = kv[0].shape[3] // adapters
        scores, p = (x.view(heads, n, adapters, tokens) for x in scratch)
        for row in range(b):  # [H, N, d] views with the heads as the batch: no copy of the query
            torch.bmm(q[row], kv[0][row], out=scores.view(heads, n, -1))
            torch.softmax(scores, 3, out=p)
            if factor is not None:
                p.mul_(factor[row % len(factor)].transpose(0, 1))  # [N or 1, A, 1]
            out[row].baddbmm_(p.view(heads, n, -1), kv[1][row])  # sums adapters together
    elif form == "per adapter" or adapters == 1:
        for a, (k_ip, v_ip) in enumerate(zip(kv[0].split(heads, 1), kv[1].split(heads, 1))):
            term = _sdpa(q, k_ip, v_ip, upcast)
            if factor is None:
                out.add_(term)  # one kernel
            else:
                out.addcmul_(term, factor[:, a, None])  # one kernel: mask and sigma gate in one factor
    else:  # A adapters as extra heads of one attention call: [B, A*H, N, d]
        queries = q.unsqueeze(1).expand(b, adapters, heads, n, d).reshape(b, -1, n, d)
        term = _sdpa(queries, *kv, upcast).view(b, adapters, heads, n, d)
        if factor is not None:
            term.mul_(factor[:, :, None])  # [B or 1, A, 1, N or 1, 1] over [B, A, H, N, d]
        out.add_(term.sum(1))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool) -> torch.Tensor:
    """torch's SDPA, [B, H, N, d], whatever the host's attention: what the host itself uses on GPUs, and on
    the CPU faster than the host's default there, which chunks the queries. ``upcast``: in fp32."""
    if upcast:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def token_groups(adapters: tuple[AdapterSpec, ...], layer: int) -> tuple[tuple[int, ...], ...]:
    """The adapters active at ``layer`` (weight not 0), grouped by image token count: each group attends together."""
    groups: dict[int, list[int]] = {}
    for index, adapter in enumerate(adapters):
        if adapter.layer_weights[layer] != 0:
            groups.setdefault(adapter.cond_tokens.shape[1], []).append(index)
    return tuple(map(tuple, groups.values()))


class DecoupledCrossAttention:
    """The attn2 replacement registered on every cross-attention layer of one patched model.

    ``layers`` maps the host's (block, id, depth index) to the adapter layer index. ``uncond_chunks(options)``
    returns, per batch chunk, whether the chunk belongs to an unconditional (negative-side) conditioning.
    ``window_frames(options, rows)`` returns the frame index of each of a chunk's ``rows`` latents when the UNet
    runs on a window of the frames, or None when a chunk holds frames 0..rows-1."""

    def __init__(self, attention: AttentionFn, layers: dict[LayerKey, int], adapters: tuple[AdapterSpec, ...],
                 uncond_chunks: Callable[[dict], tuple[bool, ...]],
                 window_frames: Callable[[dict, int], tuple[int, ...] | None] = lambda options, rows: None):
        self.attention = attention
        self.layers = layers
        self.adapters = adapters
        self.uncond_chunks = uncond_chunks
        self.window_frames = window_frames
        self.groups = {layer: token_groups(adapters, layer) for layer in set(layers.values())}
        self._batched: dict = {}
        self._step: tuple = (None, {})  # this step's sigmas tensor and the sigma-gated factors computed for it

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        heads, precision = options["n_heads"], options.get("attn_precision")
        out = self.attention(q, k, v, heads, attn_precision=precision, transformer_options=options).contiguous()
        block = options["block"]
        layer = self.layers[(block[0], block[1], options.get("block_index", 0))]
        flags = self.uncond_chunks(options)
        b, n, _ = q.shape
        rows = b // len(flags)
        frames = self.window_frames(options, rows)
        upcast = precision is torch.float32 and q.dtype != torch.float32  # the model asks for fp32 attention
        for group in self.groups[layer]:
            tokens = self.adapters[group[0]].cond_tokens.shape[1]
            factor = self._factor(group, n, options, q.device, q.dtype, len(flags), rows, frames)
            form = attention_form(q.device, tokens, heads, upcast)
            on_cpu = form != "extra heads"  # there reading a tensor back costs nothing, and skipped rows are saved time
            if on_cpu and factor is not None and not factor.any():
                continue  # outside every adapter's sigma range, or masked out everywhere on this layer
            period = self._period(group)
            if frames is None or period == 1:
                kv = self._kv(form, group, layer, flags, rows, heads, q.device, q.dtype)
            else:  # a window of an unfolded batch: the rows of the window's frames, from one cycle of the images
                kv = self._kv(form, group, layer, flags, period, heads, q.device, q.dtype)
                pick = self._index(("window", len(flags), period, frames), q.device,
                                   lambda: [c * period + f % period for c in range(len(flags)) for f in frames])
                kv = tuple(x.index_select(0, pick) for x in kv)
            masked = self._masked_rows(group, n, options, q.device, q.dtype) if on_cpu and factor is not None else None
            scratch = None
            if form in PRODUCTS:
                scratch = self._scratch(heads * len(group) * tokens * (n if masked is None else len(masked)), q)
            if masked is None:
                add_image_term(form, head_major(q, heads), head_major(out, heads), kv, factor, len(group), upcast,
                               scratch)
            else:  # only the query rows a mask covers: gathered, attended, added back
                q_rows = q.index_select(1, masked)
                term = torch.zeros_like(q_rows)
                add_image_term(form, head_major(q_rows, heads), head_major(term, heads), kv,
                               factor.index_select(2, masked), len(group), upcast, scratch)
                out.index_add_(1, masked, term)
        return out

    def _factor(self, group, tokens, options, device, dtype, chunks, rows, frames):
        """None when no adapter of ``group`` has a mask or sigma range; else what multiplies their image terms,
        [B or 1, A, tokens or 1, 1]: each adapter's mask on this layer's token grid (or 1), for the frame of each
        batch row when some adapter has masks per frame (``chunks`` chunks of ``rows`` latents, frames 0..rows-1
        or the window's ``frames``), times 0 or 1 for its sigma range. The range is compared on the device (no
        host sync), once per step: a step is one ``sigmas`` tensor."""
        adapters = [self.adapters[i] for i in group]
        if all(a.mask is None and a.sigma_range is None for a in adapters):
            return None
        latent_hw = tuple(options["original_shape"][-2:])
        grids = self._mask_grids(group, tokens, latent_hw, device, dtype)  # [A, F, tokens or 1, 1]
        per_frame = grids.shape[1] > 1
        key = ("factor", group, tokens, latent_hw, device, dtype) + ((chunks, rows, frames) if per_frame else ())
        if key in self._batched:
            factor = self._batched[key]
        else:
            factor = grids.transpose(0, 1)  # [1, A, tokens or 1, 1]
            if per_frame:
                last = grids.shape[1] - 1
                pick = self._index(("mask frames", chunks, rows, frames, last), device,
                                   lambda: [min(f, last) for _ in range(chunks) for f in frames or range(rows)])
                factor = factor.index_select(0, pick)
            if not (per_frame and frames):  # windows vary from step to step: their factors are not kept
                self._batched[key] = factor
        if all(a.sigma_range is None for a in adapters):
            return factor
        sigmas, gated = self._step
        if sigmas is not options["sigmas"]:
            sigmas, gated = self._step = (options["sigmas"], {})
        if key not in gated:
            if group not in gated:
                ranges_key = ("ranges", group, device)  # [A, 2] (high, low), copied to the device once
                if ranges_key not in self._batched:
                    self._batched[ranges_key] = torch.tensor(
                        [a.sigma_range or (float("inf"), float("-inf")) for a in adapters], device=device)
                high, low = self._batched[ranges_key].unbind(1)
                gated[group] = ((sigmas[:1] <= high) & (sigmas[:1] >= low)).to(dtype)[:, None, None]
            gated[key] = factor * gated[group]
        return gated[key]

    def _mask_grids(self, group, tokens, latent_hw, device, dtype):
        """Each adapter's masks on this layer's token grid, [A, F, tokens or 1, 1]: F the most masks an adapter of
        ``group`` has (an adapter's last mask repeated after its own), ones for an adapter without a mask."""
        key = ("grids", group, tokens, latent_hw, device, dtype)
        if key not in self._batched:
            masks = [self.adapters[i].mask for i in group]
            count = max((len(m) for m in masks if m is not None), default=1)
            rows = tokens if any(m is not None for m in masks) else 1
            grids = [torch.ones(1, rows, 1) if m is None else mask_grid(m, tokens, latent_hw) for m in masks]
            self._batched[key] = torch.stack([g[torch.arange(count).clamp(max=len(g) - 1)] for g in grids]).to(
                device, dtype)
        return self._batched[key]

    def _scratch(self, size, like):
        """Two flat buffers of ``size`` values (``like``'s device and dtype) for the products' scores and
        probabilities, kept across calls and grown to the largest layer: allocating a fresh 2-10 MB tensor per
        call was measured at 1.3-1.7x the product forms' time on the CPU (page faults, as the allocator hands
        memory back and forth). Calls run one at a time, as the host samples."""
        key = ("scratch", like.device, like.dtype)
        if key not in self._batched or self._batched[key][0].numel() < size:
            self._batched[key] = (like.new_empty(size), like.new_empty(size))
        return tuple(x[:size] for x in self._batched[key])

    def _masked_rows(self, group, tokens, options, device, dtype):
        """The query rows [M] where some adapter of ``group`` has a mask above 0 (on any frame), when every adapter
        has a mask and they cover at most ``MASKED_ROWS_MAX_SHARE`` of the rows; else None (all rows). Read from
        the mask grids ``_factor`` used for this layer."""
        if any(self.adapters[i].mask is None for i in group):
            return None
        latent_hw = tuple(options["original_shape"][-2:])
        key = ("rows", group, tokens, latent_hw, device)
        if key not in self._batched:
            grids = self._mask_grids(group, tokens, latent_hw, device, dtype)  # [A, F, tokens, 1]
            rows = (grids.amax((0, 1))[:, 0] > 0).nonzero()[:, 0]
            self._batched[key] = rows if len(rows) <= MASKED_ROWS_MAX_SHARE * tokens else None
        return self._batched[key]

    def _period(self, group) -> int:
        """After how many frames the images of ``group``'s adapters repeat together (1: none is unfolded)."""
        key = ("period", group)
        if key not in self._batched:
            self._batched[key] = math.lcm(*(self.adapters[i].cond_tokens.shape[0] for i in group))
        return self._batched[key]

    def _index(self, key, device, values):
        """An index tensor of ``values()`` on ``device``, made once per ``key``: copying a fresh one to a GPU on
        every call would wait for the GPU (a host sync)."""
        key = ("index", key, device)
        if key not in self._batched:
            self._batched[key] = torch.tensor(values(), device=device)
        return self._batched[key]

    def _batched_kv(self, group, layer, flags, rows, heads, device, dtype):
        """The image K/V of ``group``'s adapters laid out like the batch, head-major, adapter by adapter:
        [B, A*H, T, d]. Uncond chunks get the uncond tokens, the rest cond; row r of a chunk gets image r mod n."""
        key = (group, layer, flags, rows, heads, device, dtype)
        if key not in self._batched:
            keys, values = [], []
            for index in group:
                adapter = self.adapters[index]
                k_pair, v_pair = adapter.image_kv(layer, device, dtype)
                n = adapter.cond_tokens.shape[0]
                pick = torch.tensor([(0 if uncond else n) + r % n for uncond in flags for r in range(rows)],
                                    device=device)
                for x, found in ((k_pair, keys), (v_pair, values)):
                    x = x.index_select(0, pick)
                    found.append(x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2))
            self._batched[key] = (torch.cat(keys, dim=1), torch.cat(values, dim=1))  # cat copies: contiguous
        return self._batched[key]

    def _kv(self, form, group, layer, flags, rows, heads, device, dtype):
        """``_batched_kv`` laid out for ``form``: SDPA takes it as it is; the products take V [B, H, A*T, d]
        and K / sqrt(d), as [B, H, A*T, d] ("key-major products") or transposed, [B, H, d, A*T] ("head products")."""
        k_ip, v_ip = self._batched_kv(group, layer, flags, rows, heads, device, dtype)
        if form not in PRODUCTS:
            return k_ip, v_ip
        key = (form, group, layer, flags, rows, heads, device, dtype)
        if key not in self._batched:
            b, _, tokens, d = k_ip.shape
            k_ip, v_ip = [x.view(b, len(group), heads, tokens, d).transpose(1, 2).reshape(b, heads, -1, d)
                          for x in (k_ip * d ** -0.5, v_ip)]  # [B, H, A*T, d]
            if form == "head products":
                k_ip = k_ip.transpose(2, 3).contiguous()
            self._batched[key] = (k_ip, v_ip)
        return self._batched[key]

    def __deepcopy__(self, memo):
        """Hosts up to 0.3.x deep-copy model options on every clone (newer ones copy only the dicts and
        lists); either way clones share this object (its caches are keyed by layer, device, dtype and
        step, so clones may use them together)."""
        return self

    def to(self, *args, **kwargs):
        """The host moves patches with the model; K/V are cached per device and dtype, so nothing moves here."""
        return self
