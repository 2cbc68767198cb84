"""Per-reference controls on edit models that read reference latents as tokens, through the host's hooks.

A controlled conditioning carries one hook of ours (the host's ``TransformerOptionsHook``, scope "hooked only"):
an APPLY_MODEL wrapper that, for the model calls of that conditioning only, lays out the joint sequence from the
call (text tokens, the output's grid, each reference latent), turns the controls into the additive attention bias
of ``instruct_edit.reference_attention`` and hands it to every joint attention of the call through the host's
attention override (chained: an override another pack set runs with our bias in its mask). The host's samplers,
text encoders and ``ReferenceLatent`` nodes stay as they are.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import comfy.hooks
import comfy.patcher_extension
import torch

from ...instruct_edit.reference_attention import (ReferenceBias, ReferenceControl, TokenLayout, row_scales,
                                                  sigma_gates, tokens_of)

WRAPPER_KEY = "image_prompt_reference_controls"
REFERENCES = "reference_latents"  # the host's conditioning key (ReferenceLatent, the Qwen-Image-Edit text encoders)
OVERRIDE = "optimized_attention_override"
KEPT_BIASES = 4  # layouts per conditioning (a run has one or two: the positive's, a negative's with other text)
# The diffusion models whose joint sequence is [text | output image | references...] (checked in their sources).
TOKEN_REFERENCE_MODELS = ("comfy.ldm.flux.model", "comfy.ldm.qwen_image.model")


class ReferenceSetting(NamedTuple):
    """A reference's controls as a node sets them: strength, start and end (fractions of the sampling), mask [H, W]."""
    strength: float
    start_at: float
    end_at: float
    mask: torch.Tensor | None

    @property
    def is_identity(self) -> bool:
        return self.strength == 1.0 and self.mask is None and (self.start_at, self.end_at) == (0.0, 1.0)


class JointAttentionBias:
    """The host's attention override for one model call: adds the bias to every attention over the whole joint
    sequence (query and key length L), then runs the override found before ours, or the attention itself."""

    def __init__(self, bias: torch.Tensor, previous):
        self.bias = bias
        self.previous = previous
        self.applied = 0

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        seq = -2 if kwargs.get("skip_reshape", False) else 1
        length = self.bias.shape[-1]
        if q.shape[seq] == length and k.shape[seq] == length:
            args, kwargs = self.with_bias(args, kwargs)
            self.applied += 1
        return (self.previous or _run)(func, *args, **kwargs)

    def with_bias(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positional = len(args) > 4
        mask = args[4] if positional else kwargs.get("mask")
        bias = self.bias.to(args[0].dtype)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=bias.dtype, device=mask.device).masked_fill(~mask, -math.inf)
            bias = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) + bias
        if positional:
            return (*args[:4], bias, *args[5:]), kwargs
        return args, {**kwargs, "mask": bias}


def _run(func, *args, **kwargs):
    return func(*args, **kwargs)


class ReferenceControlsWrapper:
    """APPLY_MODEL wrapper holding one conditioning's controls by reference index (0-based)."""

    def __init__(self, settings: dict[int, ReferenceSetting]):
        self.settings = settings
        self._lock = threading.Lock()
        self._biases: dict[tuple, tuple[ReferenceBias, torch.Tensor | None]] = {}

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        references = kwargs.get("ref_latents") or []
        base_model = executor.class_obj
        layout = self.layout(base_model, x, c_crossattn, references)
        if layout is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        bias, ranges = self.bias(base_model, layout, x.device, base_model.manual_cast_dtype or base_model.get_dtype())
        override = JointAttentionBias(bias.at(None if ranges is None else sigma_gates(t, ranges)),
                                      transformer_options.get(OVERRIDE))
        transformer_options[OVERRIDE] = override
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            if override.previous is None:
                transformer_options.pop(OVERRIDE, None)
            else:
                transformer_options[OVERRIDE] = override.previous
        if not override.applied:
            raise RuntimeError(f"reference controls: no attention of {type(base_model.diffusion_model).__name__} ran "
                               f"over the joint sequence of {layout.length} tokens {layout}; this host lays out "
                               "reference tokens in a way this pack does not know")
        return out

    def layout(self, base_model, x: torch.Tensor, context: torch.Tensor, references: list) -> TokenLayout | None:
        """The call's joint sequence, or None when every reference runs as the model has it (or there is none:
        the branch without references of the Reference Edit Guider)."""
        if not references or all(setting.is_identity for setting in self.settings.values()):
            return None
        model = base_model.diffusion_model
        if type(model).__module__ not in TOKEN_REFERENCE_MODELS:
            raise ValueError(f"reference controls: {type(model).__name__} does not read reference latents as tokens "
                             "(FLUX.1 Kontext, FLUX.2 and Qwen-Image-Edit do); connect the conditioning to one of them")
        missing = [i + 1 for i in self.settings if i >= len(references)]
        if missing:
            raise ValueError(f"reference: this model call has {len(references)} reference latent(s), so reference "
                             f"{missing[0]} does not exist")
        patch = model.patch_size
        counts = tuple(math.prod(tokens_of(r.shape[-2:], patch)) for r in references)
        return TokenLayout(context.shape[1], tokens_of(x.shape[-2:], patch), counts)

    def bias(self, base_model, layout: TokenLayout, device, dtype) -> tuple[ReferenceBias, torch.Tensor | None]:
        """The layout's bias (built once per layout, device and dtype) and the [R, 2] sigma ranges, or None
        when every reference runs over the whole sampling."""
        key = (layout, device, dtype, id(base_model.model_sampling))
        with self._lock:
            if key not in self._biases:
                if len(self._biases) >= KEPT_BIASES:  # an L x L tensor each: keep this run's few layouts only
                    self._biases.pop(next(iter(self._biases)))
                controls = tuple(self.control(base_model, i) for i in range(len(layout.references)))
                timed = any(c.sigma_range != ReferenceControl().sigma_range for c in controls)
                ranges = torch.tensor([c.sigma_range for c in controls], device=device) if timed else None
                self._biases[key] = (ReferenceBias(row_scales(controls, layout), layout, device, dtype), ranges)
            return self._biases[key]

    def control(self, base_model, index: int) -> ReferenceControl:
        setting = self.settings.get(index)
        if setting is None:
            return ReferenceControl()
        sampling = base_model.model_sampling
        start = math.inf if setting.start_at <= 0 else float(sampling.percent_to_sigma(setting.start_at))
        end = -math.inf if setting.end_at >= 1 else float(sampling.percent_to_sigma(setting.end_at))
        return ReferenceControl(setting.strength, (start, end), setting.mask)


def ours(hook) -> ReferenceControlsWrapper | None:
    wrappers = getattr(hook, "transformers_dict", None) or {}
    found = wrappers.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).get(WRAPPER_KEY)
    return found[0] if found else None


def control_reference(conditioning: list, index: int, setting: ReferenceSetting) -> list:
    """``conditioning`` with reference ``index`` (0-based) of each entry under ``setting``: one hook of ours per
    entry, holding every reference's setting (a second control of the same reference replaces the first)."""
    out = []
    for tensor, values in conditioning:
        count = len(values.get(REFERENCES) or [])
        if index >= count:
            raise ValueError(f"reference: this conditioning has {count} reference latent(s) (from ReferenceLatent or "
                             f"the Qwen-Image-Edit text encoder), so reference {index + 1} does not exist")
        group = values["hooks"].clone() if values.get("hooks") is not None else comfy.hooks.HookGroup()
        settings = {}
        for hook, wrapper in [(hook, ours(hook)) for hook in group.hooks]:
            if wrapper is not None:
                settings.update(wrapper.settings)
                group.remove(hook)
        settings[index] = setting
        wrapper = ReferenceControlsWrapper(settings)
        group.add(comfy.hooks.TransformerOptionsHook(
            {"wrappers": {comfy.patcher_extension.WrappersMP.APPLY_MODEL: {WRAPPER_KEY: [wrapper]}}},
            hook_scope=comfy.hooks.EnumHookScope.HookedOnly))
        out.append([tensor, {**values, "hooks": group}])
    return out
