"""The host's context windows (comfy.context_windows), as its Context Windows nodes hand them to the model."""
from __future__ import annotations


def context_window(frames, dim: int = 0, total: int = 32):
    """The host's IndexListContextWindow over ``frames`` (newer hosts also take the length of the whole batch)."""
    import inspect

    from comfy.context_windows import IndexListContextWindow
    takes_total = "total_frames" in inspect.signature(IndexListContextWindow).parameters
    return IndexListContextWindow(list(frames), dim=dim, **({"total_frames": total} if takes_total else {}))
