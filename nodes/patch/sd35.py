"""Image prompts on SD3.5: InstantX's image attention inside each joint block, through the host's DiT block patch.

Per step, the adapter's time-conditioned resampler turns the reference's SigLIP hidden states into tokens [B, T, D]
and a time embedding temb [B, 1280]. In joint block i, as InstantX trained it (and as diffusers'
SD3IPAdapterJointAttnProcessor2_0 computes it):

    ip = LayerNorm(tokens) * (1 + scale_i) + shift_i,     (shift_i, scale_i) = Linear_i(SiLU(temb))
    x_attn += w_i * Attn(RMS_q,i(q), [RMS_k,i(k) ; RMS_ip,i(ip W_k,i)], [v ; ip W_v,i])

where q, k, v [B, N, D] are the block's own image-stream projections (q and k before its norms), and x_attn the image
stream's joint-attention output, before the block's output projection, gate and MLP. The block's q/k norms are
RMS norms, so the adapter's norm of q is the block's normed q times (adapter weight / block weight), per channel.
The patch runs the block's own pre- and post-attention steps and the host's attention around that addition. A mask
multiplies an adapter's term on its region of the image stream's token grid (an APPLY_MODEL wrapper records the
latent's size, which the block patches cannot see), and a sigma range gates it, as on a UNet (``image_factor``).
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention

from ...ipadapter_core.adapter_spec import check_image_weights
from ...ipadapter_core.batch_layout import BatchLayout
from ...ipadapter_core.image_factor import ImageFactor, LayerGrid
from .hooks import DIT_BLOCK, CallCount, LatentSize, batch_layout, record_latent_size, tag_uncond_conds, watch
from .layers import ModelFit

NORM_EPS = 1e-6
LAYER_KIND = "joint blocks (DiT block patches)"


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
    _moved: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        check_image_weights(self.image_weights, self.cond_embeds.shape[0])

    def block(self, index: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Block ``index``'s adapter weights on ``device`` in ``dtype`` (copied once)."""
        key = (index, device, dtype)
        if key not in self._moved:
            self._moved[key] = {k: v.to(device, dtype) for k, v in self.blocks[index].items()}
        return self._moved[key]


class SD3ImagePrompt:
    """The image terms of one patched SD3.5 model's adapters; one ``JointBlockPatch`` per joint block calls it.

    ``timestep(sigmas)`` is the model's timestep of a step's sigma (what the resampler is conditioned on); ``latent``
    the latent size of the model call in progress, ``patch_size`` the MMDiT's (together: the token grid); ``inner``
    the block patches that were there before ours (another pack's, by block index), run around our block;
    ``count`` counts the block calls (``hooks.watch``)."""

    def __init__(self, blocks, adapters: tuple[TimeConditionedSpec, ...], timestep, latent: LatentSize,
                 patch_size: int, inner: dict[int, object], count: CallCount):
        self.blocks = blocks
        self.adapters = adapters
        self.timestep = timestep
        self.latent = latent
        self.patch_size = patch_size
        self.inner = inner
        self.count = count
        self.factors = ImageFactor(adapters)
        self._step = threading.local()  # per thread (concurrent calls on several devices): this step's tokens
        self._ratios: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._made: dict[tuple, object] = {}  # made once: resamplers by device, rows and row weights by layout

    def tokens(self, index: int, layout: BatchLayout, sigmas: torch.Tensor, device, dtype):
        """Adapter ``index``'s (tokens [B, T, D], temb [B, W]) at this step: computed at the first block, reused;
        the resampler runs once per distinct reference row (cond and uncond of each image), not per batch row."""
        step_sigmas, step_layout, cache = getattr(self._step, "tokens", (None, None, {}))
        if sigmas is not step_sigmas or layout != step_layout:
            cache = {}
            self._step.tokens = (sigmas, layout, cache)
        if index not in cache:
            distinct, pick = self.rows(index, layout, device)
            t = self.timestep(sigmas[:1]).float().to(device).expand(distinct.shape[0])
            resampler = self.resampler(index, device)
            with torch.no_grad():
                tokens, temb = resampler(distinct, t)
            if pick is not None:
                tokens, temb = tokens.index_select(0, pick), temb.index_select(0, pick)
            cache[index] = (tokens.to(dtype), temb.to(dtype))
        return cache[index]

    def resampler(self, index: int, device) -> torch.nn.Module:
        """Adapter ``index``'s resampler on ``device``: the loaded one where it is, else a copy made once (the
        loaded adapter stays where it was, for other models)."""
        key = ("resampler", index, device)
        if key not in self._made:
            resampler = self.adapters[index].resampler
            here = next(resampler.parameters()).device == torch.device(device)
            self._made[key] = resampler if here else copy.deepcopy(resampler).to(device)
        return self._made[key]

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

    def norm_ratios(self, block, weights: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter norm_q / block ln_q, adapter norm_k / block ln_k) weights, [head_dim] each."""
        key = (id(block), id(weights), device, dtype)
        if key not in self._ratios:
            attn = block.x_block.attn
            self._ratios[key] = tuple((weights[name] / norm.weight.to(device, dtype)) for name, norm in
                                      (("norm_q.weight", attn.ln_q), ("norm_k.weight", attn.ln_k)))
        return self._ratios[key]

    def factor(self, index: int, layout: BatchLayout, sigmas: torch.Tensor, tokens: int, device, dtype):
        """Adapter ``index``'s mask on this call's token grid times its sigma gate, [B or 1, tokens or 1, 1]; or
        None when it has neither."""
        if not self.factors.applies((index,)):
            return None
        grid = LayerGrid((index,), tokens, self.latent.grid(self.patch_size), device, dtype)
        return self.factors.factor(grid, layout, sigmas)[:, 0]

    def image_term(self, block_index: int, x_qkv, layout: BatchLayout, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Every adapter's term for the image stream of joint block ``block_index`` ([B, N, D]), or None."""
        block = self.blocks[block_index]
        q, k, v = x_qkv
        b, n, d = q.shape
        heads = block.x_block.attn.num_heads
        total = None
        for index, spec in enumerate(self.adapters):
            weight = spec.layer_weights[block_index]
            if weight == 0:
                continue
            p = spec.block(block_index, q.device, q.dtype)
            tokens, temb = self.tokens(index, layout, sigmas, q.device, q.dtype)
            shift, scale = F.linear(F.silu(temb), p["norm_ip.linear.weight"], p["norm_ip.linear.bias"]).chunk(2, dim=-1)
            ip = F.layer_norm(tokens, (tokens.shape[-1],), eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
            ip_k = F.rms_norm(F.linear(ip, p["to_k_ip.weight"]).unflatten(-1, (heads, -1)), (d // heads,),
                              p["norm_ip_k.weight"], NORM_EPS)
            ip_v = F.linear(ip, p["to_v_ip.weight"]).unflatten(-1, (heads, -1))
            q_ratio, k_ratio = self.norm_ratios(block, p, q.device, q.dtype)
            queries = (q.unflatten(-1, (heads, -1)) * q_ratio).transpose(1, 2)
            keys = torch.cat([k.unflatten(-1, (heads, -1)) * k_ratio, ip_k], dim=1).transpose(1, 2)
            values = torch.cat([v.reshape(b, n, heads, -1), ip_v], dim=1).transpose(1, 2)  # v comes per head
            term = F.scaled_dot_product_attention(queries, keys, values).transpose(1, 2).reshape(b, n, d)
            term = term * weight
            for factor in (self.image_weights(index, layout, q.device, q.dtype),
                           self.factor(index, layout, sigmas, n, q.device, q.dtype)):
                if factor is not None:
                    term = term * factor
            total = term if total is None else total + term
        return total


class JointBlockPatch:
    """The ("dit", "double_block", i) patch of joint block i: the host's block mixing, with the image term added to
    the image stream's attention output. A block patch another pack set there before ours runs around it (it gets
    our block as its ``original_block``)."""

    def __init__(self, prompt: SD3ImagePrompt, index: int):
        self.prompt = prompt
        self.index = index

    def __call__(self, args: dict, extra: dict) -> dict:
        self.prompt.count.ran()
        inner = self.prompt.inner.get(self.index)
        if inner is not None:
            return inner(args, {**extra, "original_block": self.block})
        return self.block(args)

    def block(self, args: dict) -> dict:
        """Joint block ``index`` on ``args`` (txt, img, vec, transformer_options) with the image term."""
        options = args["transformer_options"]
        block = self.prompt.blocks[self.index]
        context, x, c = args["txt"], args["img"], args["vec"]
        context_qkv, context_rest = block.context_block.pre_attention(context, c)
        x_qkv, x_rest = block.x_block.pre_attention(x, c)
        qkv = [torch.cat((a, b), dim=1) for a, b in zip(context_qkv, x_qkv)]
        attn = optimized_attention(*qkv, heads=block.x_block.attn.num_heads, transformer_options=options)
        context_attn, x_attn = attn[:, :context_qkv[0].shape[1]], attn[:, context_qkv[0].shape[1]:]
        term = self.prompt.image_term(self.index, x_qkv, batch_layout(options, x.shape[0]), options["sigmas"])
        if term is not None:
            x_attn = x_attn + term
        context = None if block.context_block.pre_only else block.context_block.post_attention(context_attn,
                                                                                               *context_rest)
        return {"txt": context, "img": block.x_block.post_attention(x_attn, *x_rest)}

    def __deepcopy__(self, memo):
        return self  # clones share it (see DecoupledCrossAttention.__deepcopy__)

    def to(self, *args, **kwargs):
        return self  # weights are moved per device and dtype when used


def joint_blocks(mmdit):
    """The MMDiT's joint blocks, or ValueError when a block has the layout the adapter was not trained on."""
    blocks = mmdit.joint_blocks
    if any(block.x_block.x_block_self_attn for block in blocks):
        raise ValueError("model: this MMDiT has the SD3.5 Medium layout (a second image attention in its first "
                         "blocks); InstantX's adapter is for SD3.5 Large")
    return blocks


def patch_sd35_joint_blocks(model_patcher, spec: TimeConditionedSpec, fit: ModelFit | None = None):
    """A clone of ``model_patcher`` (an SD3.5-Large MMDiT) with ``spec`` added to its joint blocks' image stream."""
    mmdit = model_patcher.get_model_object("diffusion_model")
    blocks = joint_blocks(mmdit)
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    earlier = replaces.get((DIT_BLOCK, 0))
    if isinstance(earlier, JointBlockPatch):
        earlier = earlier.prompt
        adapters, latent, inner, count = earlier.adapters + (spec,), earlier.latent, earlier.inner, earlier.count
    else:
        adapters, count = (spec,), CallCount()
        inner = {i: replaces[(DIT_BLOCK, i)] for i in range(len(blocks)) if (DIT_BLOCK, i) in replaces}
        latent = record_latent_size(patched, comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    sampling = model_patcher.get_model_object("model_sampling")
    prompt = SD3ImagePrompt(blocks, adapters, sampling.timestep, latent, mmdit.patch_size, inner, count)
    for i in range(len(blocks)):
        patched.set_model_patch_replace(JointBlockPatch(prompt, i), "dit", DIT_BLOCK, i)
    tag_uncond_conds(patched)
    watch(patched, LAYER_KIND, count)
    return patched
