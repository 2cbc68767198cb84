"""How the image attention of one token group runs: four forms, one class each, and the choice per device.

Each form adds the image terms of the adapters of one token group (A adapters with T image tokens each) to a
layer's output: ``out += sum_a factor_a * Attn(q, K_a, V_a)``. On a GPU, where a step is bound by kernel
launches, all adapters are extra heads of one SDPA call. On the CPU, where it is bound by arithmetic, torch's
SDPA vectorizes along the keys, so with 4 or 16 image keys most of each vector idles: there a few keys take two
matrix products batched over the heads, with the softmax along the keys (16 keys) or, for fewer keys than a
vector holds, along the queries (4 keys); many keys take SDPA per adapter. bench/attention_forms.py times them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KEY_MAJOR_BELOW_TOKENS = 8  # an AVX2 vector's floats: fewer keys softmax faster along the queries (3x at 4 keys)
HEAD_PRODUCTS_MAX_TOKENS = 64  # products and SDPA are even at 64 tokens; at 257 SDPA is 1.3-3x faster

KV = tuple[torch.Tensor, torch.Tensor]


def head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] as a view [B, H, N, d]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool) -> torch.Tensor:
    """torch's SDPA, [B, H, N, d], whatever the host's attention: what the host itself uses on GPUs, and on
    the CPU faster than the host's default there, which chunks the queries. ``upcast``: in fp32."""
    if upcast:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class AttentionForm:
    """One way to add a token group's image terms to a layer's output.

    ``lay_out`` arranges the group's image K/V, given as [B, A*H, T, d] (adapter by adapter), for ``add``
    (once per layer and batch layout; the result is cached). ``add(q, out, kv, factor, adapters, upcast,
    scratch)`` adds ``sum_a factor_a * Attn(q, K_a, V_a)`` to ``out``: ``q`` and ``out`` are head-major views
    [B, H, N, d]; ``factor`` [B or 1, A, N or 1, 1] (mask and sigma gate, see image_factor) or None. Forms
    with ``uses_scratch`` write scores and probabilities into ``scratch``, two flat buffers of
    ``scratch_size`` values."""
    name = ""
    uses_scratch = False

    def lay_out(self, k: torch.Tensor, v: torch.Tensor, adapters: int) -> KV:
        return k, v

    def scratch_size(self, heads: int, adapters: int, tokens: int, rows: int) -> int:
        return heads * adapters * tokens * rows if self.uses_scratch else 0

    def add(self, q: torch.Tensor, out: torch.Tensor, kv: KV, factor: torch.Tensor | None, adapters: int,
            upcast: bool, scratch: KV | None = None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention form {self.name}>"


class PerAdapter(AttentionForm):
    """One SDPA call per adapter on [B, H, N, d] with K/V [B, H, T, d], and one fused add (times the factor)."""
    name = "per adapter"

    def add(self, q, out, kv, factor, adapters, upcast, scratch=None):
        heads = q.shape[1]
        for a, (k_ip, v_ip) in enumerate(zip(kv[0].split(heads, 1), kv[1].split(heads, 1))):
            term = sdpa(q, k_ip, v_ip, upcast)
            if factor is None:
                out.add_(term)  # one kernel
            else:
                out.addcmul_(term, factor[:, a, None])  # one kernel: mask and sigma gate in one factor


class ExtraHeads(AttentionForm):
    """The GPU's form: the A adapters as extra heads of one SDPA call, queries [B, A*H, N, d] against K/V
    [B, A*H, T, d], summed over the adapters in one add. One adapter runs as PerAdapter."""
    name = "extra heads"

    def add(self, q, out, kv, factor, adapters, upcast, scratch=None):
        if adapters == 1:
            PER_ADAPTER.add(q, out, kv, factor, adapters, upcast)
            return
        b, heads, n, d = q.shape
        queries = q.unsqueeze(1).expand(b, adapters, heads, n, d).reshape(b, -1, n, d)
        term = sdpa(queries, *kv, upcast).view(b, adapters, heads, n, d)
        if factor is not None:
            term.mul_(factor[:, :, None])  # [B or 1, A, 1, N or 1, 1] over [B, A, H, N, d]
        out.add_(term.sum(1))


class MatrixProducts(AttentionForm):
    """The CPU's forms for a few keys: scores and probabilities from two matrix products per batch row, batched
    over the heads, into the scratch buffers; the adapters' keys side by side, so one product sums them."""
    uses_scratch = True

    def lay_out(self, k, v, adapters):
        """K / sqrt(d) and V as [B, H, A*T, d]."""
        b, _, tokens, d = k.shape
        return tuple(x.view(b, adapters, -1, tokens, d).transpose(1, 2).reshape(b, -1, adapters * tokens, d)
                     for x in (k * d ** -0.5, v))


class KeyMajorProducts(MatrixProducts):
    """Scores [H, A*T, N] = K q^T, each adapter's softmax over its T keys taken along N (faster than along T
    for fewer keys than a vector holds), out [H, N, d] += P^T V. K/V [B, H, A*T, d]."""
    name = "key-major products"

    def add(self, q, out, kv, factor, adapters, upcast, scratch=None):
        b, heads, n, d = q.shape
        tokens = kv[0].shape[2] // adapters
        scores, p = (x.view(heads, adapters, tokens, n) for x in scratch)
        for row in range(b):
            torch.bmm(kv[0][row], q[row].transpose(1, 2), out=scores.view(heads, -1, n))
            torch.softmax(scores, 2, out=p)
            if factor is not None:
                p.mul_(factor[row % len(factor)].transpose(1, 2))  # [A, 1, N or 1]
            out[row].baddbmm_(p.view(heads, -1, n).transpose(1, 2), kv[1][row])  # sums adapters together


class HeadProducts(MatrixProducts):
    """Scores [H, N, A*T] = q K^T on [H, N, d] views with the heads as the batch (no copy of the query), the
    softmax along each adapter's T keys, out [H, N, d] += P V. K transposed [B, H, d, A*T], V [B, H, A*T, d]."""
    name = "head products"

    def lay_out(self, k, v, adapters):
        k, v = super().lay_out(k, v, adapters)
        return k.transpose(2, 3).contiguous(), v

    def add(self, q, out, kv, factor, adapters, upcast, scratch=None):
        b, heads, n, d = q.shape
        tokens = kv[0].shape[3] // adapters
        scores, p = (x.view(heads, n, adapters, tokens) for x in scratch)
        for row in range(b):
            torch.bmm(q[row], kv[0][row], out=scores.view(heads, n, -1))
            torch.softmax(scores, 3, out=p)
            if factor is not None:
                p.mul_(factor[row % len(factor)].transpose(0, 1))  # [N or 1, A, 1]
            out[row].baddbmm_(p.view(heads, n, -1), kv[1][row])  # sums adapters together


EXTRA_HEADS, PER_ADAPTER = ExtraHeads(), PerAdapter()
KEY_MAJOR_PRODUCTS, HEAD_PRODUCTS = KeyMajorProducts(), HeadProducts()
FORMS: tuple[AttentionForm, ...] = (EXTRA_HEADS, PER_ADAPTER, KEY_MAJOR_PRODUCTS, HEAD_PRODUCTS)


@dataclass(frozen=True)
class AttentionPlan:
    """How a token group's image attention runs on a device: its ``form``, and whether reading a tensor back
    to the host is free there (``reads_back``: on the CPU no GPU has to be waited for), which lets a call skip
    a group that its sigma gate or masks switch off, and attend only the rows a small mask covers."""
    form: AttentionForm
    reads_back: bool


def attention_plan(device_type: str, tokens: int, upcast: bool) -> AttentionPlan:
    """The plan for adapters with ``tokens`` image tokens on a device of ``device_type``: on a GPU extra heads
    and no reading back; on the CPU products for a few tokens (key-major for fewer keys than a vector holds),
    else SDPA per adapter (repeating the query for extra heads costs more there than the calls it saves); with
    fp32 upcast, SDPA."""
    if device_type != "cpu":
        return AttentionPlan(EXTRA_HEADS, reads_back=False)
    if upcast or tokens > HEAD_PRODUCTS_MAX_TOKENS:
        return AttentionPlan(PER_ADAPTER, reads_back=True)
    return AttentionPlan(KEY_MAJOR_PRODUCTS if tokens < KEY_MAJOR_BELOW_TOKENS else HEAD_PRODUCTS, reads_back=True)


class ScratchBuffers:
    """Two flat buffers for the products' scores and probabilities, per device and dtype, kept across calls and
    grown to the largest layer: allocating a fresh 2-10 MB tensor per call was measured at 1.3-1.7x the product
    forms' time on the CPU (page faults, as the allocator hands memory back and forth). Per thread: calls that
    run at once (the host's multi-GPU samplers use threads) must not write into each other's buffers."""

    def __init__(self):
        self._local = threading.local()

    def take(self, size: int, like: torch.Tensor) -> KV:
        """Two views of ``size`` values on ``like``'s device and dtype."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (like.device, like.dtype)
        if key not in buffers or buffers[key][0].numel() < size:
            buffers[key] = (like.new_empty(size), like.new_empty(size))
        return tuple(x[:size] for x in buffers[key])
