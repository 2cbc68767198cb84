"""Image prompts on SD3.5: InstantX's image attention (``ipadapter_core.joint_attention``) inside each joint block,
through the host's DiT block patch.

The patch runs the block's own pre- and post-attention steps and the host's attention, and adds the image term to
the image stream's attention output before the block's output projection, gate and MLP. An APPLY_MODEL wrapper
records the latent's size (for masks), which the block patches cannot see.
"""
from __future__ import annotations

import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...ipadapter_core.joint_attention import JointAdapterWeights, JointImageTerms, TimeConditionedSpec
from .hooks import DIT_BLOCK, CallCount, ModelCall, batch_layout, record_model_call, tag_uncond_conds, watch
from .layers import ModelFit

LAYER_KIND = "joint blocks (DiT block patches)"


class SD3ImagePrompt(JointImageTerms):
    """The image terms of one patched SD3.5 model, with what the host glue needs: the patched ``mmdit``, the model
    call in progress (its latent size, with the MMDiT's ``patch_size`` the token grid, and the MMDiT that runs, whose
    joint blocks are used), the block patches that were there before ours (``inner``, another pack's, by block index;
    run around our block), ``count``, the block calls (``hooks.watch``), and ``weight_models``, the model patchers
    of each adapter's weights (the host loads them with the model: ``models``). One ``JointBlockPatch`` per joint
    block calls it."""

    def __init__(self, mmdit, adapters: tuple[TimeConditionedSpec, ...], timestep, model_call: ModelCall,
                 patch_size: int, inner: dict[int, object], count: CallCount, weight_models: tuple):
        super().__init__(adapters, timestep, tuple(patcher.model for patcher in weight_models))
        self.weight_models = weight_models
        self.mmdit = mmdit
        self.model_call = model_call
        self.patch_size = patch_size
        self.inner = inner
        self.count = count


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
        block = self.prompt.model_call.running(self.prompt.mmdit).joint_blocks[self.index]
        context, x, c = args["txt"], args["img"], args["vec"]
        context_qkv, context_rest = block.context_block.pre_attention(context, c)
        x_qkv, x_rest = block.x_block.pre_attention(x, c)
        qkv = [torch.cat((a, b), dim=1) for a, b in zip(context_qkv, x_qkv)]
        attn = optimized_attention(*qkv, heads=block.x_block.attn.num_heads, transformer_options=options)
        context_attn, x_attn = attn[:, :context_qkv[0].shape[1]], attn[:, context_qkv[0].shape[1]:]
        attn_module = block.x_block.attn
        term = self.prompt.image_term(self.index, x_qkv, attn_module.num_heads,
                                      (attn_module.ln_q.weight, attn_module.ln_k.weight),
                                      batch_layout(options, x.shape[0]), options["sigmas"],
                                      self.prompt.model_call.grid(self.prompt.patch_size))
        if term is not None:
            x_attn = x_attn + term
        context = None if block.context_block.pre_only else block.context_block.post_attention(context_attn,
                                                                                               *context_rest)
        return {"txt": context, "img": block.x_block.post_attention(x_attn, *x_rest)}

    def models(self) -> list:
        """The adapter weights' model patchers: the host loads (and offloads) the models its patches name with the
        model they patch (``ModelPatcher.model_patches_models``)."""
        return list(self.prompt.weight_models)

    def __deepcopy__(self, memo):
        return self  # clones share it (see DecoupledCrossAttention.__deepcopy__)

    def to(self, *args, **kwargs):
        return self  # the host moves the weights' own model patchers


def joint_blocks(mmdit):
    """The MMDiT's joint blocks, or ValueError when a block has the layout the adapter was not trained on."""
    blocks = mmdit.joint_blocks
    if any(block.x_block.x_block_self_attn for block in blocks):
        raise ValueError("model: this MMDiT has the SD3.5 Medium layout (a second image attention in its first "
                         "blocks); InstantX's adapter is for SD3.5 Large")
    return blocks


def adapter_weights_model(model_patcher, spec: TimeConditionedSpec):
    """A model patcher of ``spec``'s weights, loaded where and when the host loads ``model_patcher``'s model."""
    model = model_patcher.model  # computes in its manual cast dtype where it has one, else in its weights' dtype
    dtype = getattr(model, "manual_cast_dtype", None) or next(model.diffusion_model.parameters()).dtype
    weights = JointAdapterWeights(spec, dtype)
    return comfy.model_patcher.ModelPatcher(weights, load_device=model_patcher.load_device,
                                            offload_device=model_patcher.offload_device)


def patch_sd35_joint_blocks(model_patcher, spec: TimeConditionedSpec, fit: ModelFit | None = None):
    """A clone of ``model_patcher`` (an SD3.5-Large MMDiT) with ``spec`` added to its joint blocks' image stream."""
    mmdit = model_patcher.get_model_object("diffusion_model")
    blocks = joint_blocks(mmdit)
    patched = model_patcher.clone()
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    earlier = replaces.get((DIT_BLOCK, 0))
    weights = adapter_weights_model(model_patcher, spec)
    if isinstance(earlier, JointBlockPatch):
        earlier = earlier.prompt
        adapters, model_call, inner, count = earlier.adapters + (spec,), earlier.model_call, earlier.inner, earlier.count
        weight_models = earlier.weight_models + (weights,)
    else:
        adapters, count, weight_models = (spec,), CallCount(), (weights,)
        inner = {i: replaces[(DIT_BLOCK, i)] for i in range(len(blocks)) if (DIT_BLOCK, i) in replaces}
        model_call = record_model_call(patched, comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    sampling = model_patcher.get_model_object("model_sampling")
    prompt = SD3ImagePrompt(mmdit, adapters, sampling.timestep, model_call, mmdit.patch_size, inner, count,
                            weight_models)
    for i in range(len(blocks)):
        patched.set_model_patch_replace(JointBlockPatch(prompt, i), "dit", DIT_BLOCK, i)
    tag_uncond_conds(patched)
    watch(patched, LAYER_KIND, count)
    return patched
