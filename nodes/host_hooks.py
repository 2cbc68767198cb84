"""The host's hooks every patch mechanism reads: which conditioning made each batch chunk (recorded once per
sampling run by an OUTER_SAMPLE wrapper), the frames of a context window, and the host's names of DiT blocks."""
from __future__ import annotations

import comfy.patcher_extension
import torch

UNCOND_UUIDS = "image_prompt_uncond_uuids"  # key in transformer_options, set per sampling run
WRAPPER_KEY = "image_prompt_conds"

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


def _tag_uncond_conds(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: record which conditionings (by uuid) are not the guider's positive."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    options[UNCOND_UUIDS] = frozenset(c["uuid"] for key, conds in guider.conds.items() if key != "positive"
                                      for c in (conds or ()) if "uuid" in c)
    return executor(*args, **kwargs)


def tag_uncond_conds(patched) -> None:
    """Have the guider record its non-positive conditionings on ``patched`` (once per model)."""
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _tag_uncond_conds)
