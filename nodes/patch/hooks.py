"""The host's hooks every patch mechanism reads: which conditioning made each batch chunk (recorded once per
sampling run by an OUTER_SAMPLE wrapper), the frames of a context window, the model call in progress (its latent
size, the diffusion model that runs), the host's names of DiT blocks, and a watch that warns when a hook of ours
never ran in a sampling."""
from __future__ import annotations

import logging
import math
import threading

import comfy.patcher_extension
import torch

from ...ipadapter_core.batch_layout import BatchLayout, layout_of

UNCOND_UUIDS = "image_prompt_uncond_uuids"  # key in transformer_options, set per sampling run
WRAPPER_KEY = "image_prompt_conds"
LATENT_WRAPPER_KEY = "image_prompt_model_call"
WATCH_KEY = "image_prompt_watch"  # key in transformer_options: (what our hooks patch, the object that counts calls)

DIT_BLOCK = "double_block"  # the host's name of Flux's double-stream and the MMDiT's joint blocks in DiT block patches
SINGLE_BLOCK = "single_block"  # and of Flux's single-stream blocks


def uncond_chunks(options: dict) -> tuple[bool, ...]:
    """Per batch chunk: does it come from a non-positive conditioning? Falls back to the host's CFG
    convention (cond_or_uncond 1 = negative) when the model runs outside a guider."""
    uncond = options.get(UNCOND_UUIDS)
    if uncond is not None and "uuids" in options:
        return tuple(u in uncond for u in options["uuids"])
    return tuple(c == 1 for c in options["cond_or_uncond"])


def window_frames(options: dict, rows: int) -> tuple[int, ...] | None:
    """The frame index of each latent in a batch chunk of ``rows`` latents when the UNet runs on a window of the
    frames: the host's context window along the batch (the frames its own ``get_tensor`` slices: ``index_list``, after
    the anchor frame that newer hosts' ``causal_window_fix`` puts first) or AnimateDiff-Evolved's
    (``ad_params["sub_idxs"]``). None when there is no window, or one of another length (a window left in the
    options from an earlier call)."""
    window = options.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0:
        index_list = getattr(window, "index_list", None)
        frames = window.get_tensor(torch.arange(max(index_list) + 1)).tolist() if index_list else None
    else:
        frames = (options.get("ad_params") or {}).get("sub_idxs")
    if frames is None or len(frames) != rows:
        return None
    return tuple(int(f) for f in frames)


def batch_layout(options: dict, batch: int) -> BatchLayout:
    """How one model call's ``batch`` rows split into conditioning chunks (and the frames of a window)."""
    return layout_of(options, batch, uncond_chunks, window_frames)


class ModelCall:
    """The model call in progress, recorded by a model wrapper: the latent's height and width (the block patches see
    only the patchified tokens, and masks need the grid, any aspect ratio) and the diffusion model that runs, whose
    blocks a patch must use: under the host's multi-GPU sampling a clone on another device, under a two-model guider
    the negative model. Per thread: multi-GPU sampling runs calls of one model in several threads at once."""

    def __init__(self):
        self._local = threading.local()

    @property
    def hw(self) -> tuple[int, int] | None:
        return getattr(self._local, "hw", None)

    def record(self, executor, x, *args, **kwargs):
        running = executor.class_obj  # the diffusion model (DIFFUSION_MODEL) or the host's model around it
        running = getattr(running, "diffusion_model", running)
        outer = self.hw, getattr(self._local, "model", None)
        self._local.hw, self._local.model = tuple(x.shape[-2:]), running
        try:
            return executor(x, *args, **kwargs)
        finally:
            self._local.hw, self._local.model = outer  # a later call without the wrapper must not see this one

    def running(self, patched_model):
        """The diffusion model of the call in progress, or ``patched_model`` (the one patched) outside a call."""
        return getattr(self._local, "model", None) or patched_model

    def grid(self, patch_size: int) -> tuple[int, int] | None:
        """The token grid (h, w) of the latent, patches of ``patch_size`` rounded up as the host pads them."""
        hw = self.hw
        return hw and tuple(math.ceil(side / patch_size) for side in hw)

    def __deepcopy__(self, memo):
        return self  # the wrapper and the patch that reads it must keep one object across the host's clones


def record_model_call(patched, wrapper_kind: str) -> ModelCall:
    """A ``ModelCall`` recorded by a ``wrapper_kind`` wrapper (``WrappersMP.DIFFUSION_MODEL`` or ``APPLY_MODEL``,
    whichever gets the latent before patchifying) of ``patched``."""
    model_call = ModelCall()
    patched.add_wrapper_with_key(wrapper_kind, LATENT_WRAPPER_KEY, model_call.record)
    return model_call


class CallCount:
    """How many times a patch of ours ran: the watch compares it before and after a sampling (only ever rises, so
    concurrent samplings never make it look idle)."""

    def __init__(self):
        self.calls = 0
        self.warned = False

    def ran(self) -> None:
        self.calls += 1

    def __deepcopy__(self, memo):
        return self  # clones of the patched model (deep-copied options on older hosts) count together


def watch(patched, layer_kind: str, counter: CallCount) -> None:
    """Have sampling with ``patched`` warn once when ``counter`` never rises: another pack applied after ours
    replaced our hook on ``layer_kind`` instead of wrapping it, and the image prompt would be silently lost."""
    options = patched.model_options["transformer_options"]
    patched.model_options["transformer_options"] = {**options, WATCH_KEY: (layer_kind, counter)}


def _tag_uncond_conds(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: record which conditionings (by uuid) are not the guider's positive; after the
    sampling, warn when our patch never ran (see ``watch``)."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    options[UNCOND_UUIDS] = frozenset(c["uuid"] for key, conds in guider.conds.items() if key != "positive"
                                      for c in (conds or ()) if "uuid" in c)
    layer_kind, counter = options.get(WATCH_KEY) or (None, None)
    before = counter.calls if counter is not None else None
    result = executor(*args, **kwargs)
    if counter is not None and counter.calls == before and not counter.warned:
        counter.warned = True
        logging.warning("IPAdapter Edit: the image prompt did not run: a patch applied after it replaced its hook on "
                        "the model's %s without calling it (apply that node before the IP-Adapter, or use a version "
                        "of it that keeps the patches it finds)", layer_kind)
    return result


def tag_uncond_conds(patched) -> None:
    """Have the guider record its non-positive conditionings on ``patched`` (once per model)."""
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _tag_uncond_conds)
