"""Diffusers-format SD1.5-family UNets (``UNet2DConditionModel`` keys, e.g. HQ-Edit's 8-channel UNet) in the
original (LDM) layout, which the host detects and loads.

Block numbering, with L resnets per down level (L + 1 per up level) and levels i:
- down level i, resnet / attention j  -> ``input_blocks.{1 + i(L+1) + j}.0`` / ``.1``;
  its downsampler                     -> ``input_blocks.{(i+1)(L+1)}.0.op``;
- middle resnet 0, attention, resnet 1 -> ``middle_block.0``, ``.1``, ``.2``;
- up level i, resnet / attention j    -> ``output_blocks.{i(L+1) + j}.0`` / ``.1``;
  its upsampler                       -> the level's last output block, after its attention if it has one.
Attention (transformer) keys are the same in both layouts below the block; resnet layers are renamed.
"""
from __future__ import annotations

import re
import torch

RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LAYERS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
SDXL_ONLY = ("add_embedding.", "class_embedding.")


def is_diffusers_unet(state_dict: dict) -> bool:
    return "conv_in.weight" in state_dict and "down_blocks.0.resnets.0.conv1.weight" in state_dict


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _resnet(block: str, rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{block}.{RESNET_LAYERS[layer]}.{tail}"


def ldm_key_map(keys) -> dict[str, str]:
    """diffusers key -> LDM key for every key of a diffusers SD1.5-family UNet; ValueError on any other key."""
    keys = list(keys)
    per_level = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.") + 1  # L resnets + the downsampler / upsampler
    up_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, rest: _resnet(f"input_blocks.{1 + int(i) * per_level + int(j)}.0", rest)),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, rest: f"input_blocks.{1 + int(i) * per_level + int(j)}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, rest: f"input_blocks.{(int(i) + 1) * per_level}.0.op.{rest}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda j, rest: _resnet(f"middle_block.{2 * int(j)}", rest)),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, rest: _resnet(f"output_blocks.{int(i) * per_level + int(j)}.0", rest)),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, rest: f"output_blocks.{int(i) * per_level + int(j)}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, rest: f"output_blocks.{int(i) * per_level + per_level - 1}."
                         f"{2 if int(i) in up_attention else 1}.conv.{rest}"),
        *((rf"{re.escape(name)}\.(.+)", lambda rest, ldm=ldm: f"{ldm}.{rest}") for name, ldm in TOP_LAYERS.items()),
    ]
    mapping = {}
    for key in keys:
        if key.startswith(SDXL_ONLY):
            raise ValueError(f"unet: {key} belongs to an SDXL-family UNet; only SD1.5-family diffusers UNets "
                             f"are converted (load SDXL edit models as single-file checkpoints)")
        match = next(((m, build) for pattern, build in rules if (m := re.fullmatch(pattern, key))), None)
        if match is None:
            raise ValueError(f"unet: {key} is not a key of a diffusers UNet2DConditionModel (SD1.5 family)")
        m, build = match
        mapping[key] = build(*m.groups())
    return mapping


def to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under LDM keys (no copies)."""
    return {ldm: state_dict[key] for key, ldm in ldm_key_map(state_dict).items()}

