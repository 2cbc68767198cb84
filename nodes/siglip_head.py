"""The SigLIP pooling head of a connected CLIP vision, read from its file in models/clip_vision.

The host's CLIP vision loader keeps SigLIP's encoder and leaves out its attention-pooling head (it never computes
the pooled output). The head is read from the clip_vision file whose encoder is the connected one (same final
LayerNorm), once per loaded model.
"""
from __future__ import annotations

import weakref

import folder_paths
import torch

from ..ipadapter_core.siglip_pooling import HEAD_PREFIX, PoolingHead, build_pooling_head
from ..ipadapter_core.weights_file import load_weights_only

FOLDER = "clip_vision"
IDENTITY_KEY = "vision_model.post_layernorm.weight"  # what tells the connected encoder's file from others
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host vision model -> PoolingHead


def _file_tensors(path: str, wanted) -> dict[str, torch.Tensor]:
    """The tensors of a clip_vision file whose keys ``wanted(key)`` accepts, read without loading the rest."""
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    loaded = load_weights_only(path, mmap=True)
    return {k: v for k, v in loaded.items() if wanted(k)} if isinstance(loaded, dict) else {}


def _find_head(identity: torch.Tensor) -> dict[str, torch.Tensor] | None:
    for name in folder_paths.get_filename_list(FOLDER):
        try:
            found = _file_tensors(folder_paths.get_full_path(FOLDER, name),
                                  lambda k: k == IDENTITY_KEY or k.startswith(HEAD_PREFIX))
        except Exception:  # an unreadable or foreign file is not the one
            continue
        marker = found.pop(IDENTITY_KEY, None)
        if found and marker is not None and marker.shape == identity.shape and \
                torch.equal(marker.to(identity.dtype), identity):
            return {k.removeprefix(HEAD_PREFIX): v for k, v in found.items()}
    return None


def pooling_head(clip_vision, heads: int, adapter_name: str) -> PoolingHead:
    """The pooling head of ``clip_vision`` (a host SigLIP), or ValueError saying which file it needs."""
    model = clip_vision.model
    if model not in _HEADS:
        identity = model.vision_model.post_layernorm.weight.detach().cpu()
        head = _find_head(identity)
        if head is None:
            raise ValueError(f"clip_vision: {adapter_name} reads SigLIP's pooled output, made by the pooling head "
                             f"that the host's CLIP vision loader leaves out; no file in models/clip_vision holds the "
                             f"connected SigLIP with its head ({HEAD_PREFIX}*): use a SigLIP so400m file that keeps "
                             f"it, such as google/siglip-so400m-patch14-384's model.safetensors")
        _HEADS[model] = build_pooling_head(head, heads)
    return _HEADS[model]
