"""Random-weight models in the exact layouts of real files, written into a host ``models/`` folder.

Files are built on first use and cached in a folder named after a hash of this package's code,
so a change to any builder gives a fresh set. ``ensure("checkpoints/tiny_sd15.ckpt", ...)``
builds what is missing and returns the models folder; ``stand_in(folder, real_name)`` names
the factory file that stands in for a user's real model file in example workflows.

Command line: ``python -m tools.factory [NAME ...]`` builds the named files (default: the light set).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import comfy_host
from . import host_models as hm
from .pool import WeightPools


@dataclass(frozen=True)
class FactoryModel:
    name: str                       # "<host folder>/<file name>"
    build: Callable[[], dict]       # returns the state dict to write
    stands_for: tuple[str, ...] = ()  # real file names this model replaces in example workflows
    heavy: bool = False             # full-size topology: built only when asked for


def _catalogue() -> dict[str, FactoryModel]:
    from . import dit_models, edit_models, ipadapters
    entries = [
        FactoryModel("checkpoints/tiny_sd15.ckpt", lambda: hm.sd15_checkpoint(hm.TINY_SD15_UNET, seed=1),
                     ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly-fp16.safetensors")),
        FactoryModel("checkpoints/tiny_sd15_ip2p.ckpt",
                     lambda: hm.sd15_checkpoint(dict(hm.TINY_SD15_UNET, in_channels=8), seed=2),
                     ("instruct-pix2pix-00-22000.safetensors",)),
        FactoryModel(f"diffusion_models/tiny_hq_edit/{HQ_EDIT_FILE}",
                     lambda: edit_models.diffusers_unet(edit_models.TINY_SD15_EDIT_DIFFUSERS, seed=9),
                     (f"HQ-Edit/{HQ_EDIT_FILE}", f"HQ-Edit/unet/{HQ_EDIT_FILE}")),
        FactoryModel("checkpoints/sd15_layout.ckpt", lambda: hm.sd15_checkpoint(hm.SD15_UNET, seed=3), heavy=True),
        FactoryModel("checkpoints/sdxl_layout.ckpt", lambda: hm.sdxl_checkpoint(hm.SDXL_UNET, seed=4), heavy=True),
        FactoryModel("controlnet/tiny_sd15_controlnet.pth", lambda: hm.controlnet(hm.TINY_SD15_UNET, seed=5),
                     ("control_v11p_sd15_canny.pth", "control_v11f1p_sd15_depth.pth", "control_v11p_sd15_openpose.pth")),
        FactoryModel("clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt", lambda: hm.clip_vision("ViT-H-14", seed=6),
                     ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",)),
        FactoryModel("clip_vision/CLIP-ViT-bigG-14-laion2B-39B-b160k.pt", lambda: hm.clip_vision("ViT-bigG-14", seed=7),
                     ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",)),
        FactoryModel("clip_vision/clip-vit-large-patch14-336.pt", lambda: hm.clip_vision("ViT-L-14-336", seed=8),
                     ("clip-vit-large-patch14-336.bin",)),
        FactoryModel("clip_vision/clip_vision_l.pt", lambda: hm.clip_vision("ViT-L-14", seed=10),
                     ("clip_vision_l.safetensors",)),
        FactoryModel(f"diffusion_models/{FLUX_FILE}", lambda: dit_models.flux_transformer(dit_models.FLUX_REDUCED, 30),
                     ("flux1-dev.safetensors", "flux1-dev-fp8.safetensors",  # FLUX.1 Kontext [dev]: the same layout
                      "flux1-dev-kontext_fp8_scaled.safetensors", "flux1-kontext-dev.safetensors")),
        FactoryModel("controlnet/flux_controlnet_layout.pth", lambda: dit_models.xlabs_controlnet(33),
                     ("flux-canny-controlnet-v3.safetensors",)),
        FactoryModel("vae/flux_ae_layout.pt", lambda: dit_models.flux_vae(34), ("ae.safetensors",)),
        FactoryModel("clip_vision/sigclip_vision_patch14_384.pt", lambda: dit_models.siglip_vision(36),
                     ("sigclip_vision_patch14_384.safetensors",)),
        FactoryModel("checkpoints/sd35_layout.ckpt", lambda: dit_models.sd35_checkpoint(37), ("sd3.5_large.safetensors",)),
        FactoryModel("ipadapter/sd35_layout_ip-adapter.bin",  # InstantX's adapter sized to that MMDiT (2 blocks of 128)
                     lambda: dit_models.instantx_sd35_adapter(39, blocks=2, hidden=128), ("ip-adapter.bin",)),
        FactoryModel(f"ipadapter/{INSTANTX_FLUX_FILE}",  # InstantX's adapter on that Flux (2 + 1 blocks), MLP width 16
                     lambda: dit_models.instantx_flux_adapter(
                         40, dit_models.FLUX_REDUCED["depth"] + dit_models.FLUX_REDUCED["depth_single_blocks"], 16),
                     ("FLUX.1-dev-IP-Adapter.bin",)),
        # CLIP-L text alone (the Flux examples' clip_l.safetensors); see tools.run_example for the T5 it pairs with
        FactoryModel("text_encoders/clip_l.pt", lambda: hm.clip_l_text(WeightPools(35)), ("clip_l.safetensors",)),
    ]
    for seed, stem in enumerate(dit_models.XLABS_TOKENS, start=31):  # sized to the reduced Flux's double blocks
        entries.append(FactoryModel(f"ipadapter/{stem}.bin", lambda s=stem, seed=seed: dit_models.xlabs_adapter(
            s, seed, dit_models.FLUX_REDUCED["depth"]), (f"{stem}.safetensors",)))
    for seed, variant in enumerate(ipadapters.VARIANTS, start=100):
        for ext in (".bin", ".safetensors"):
            entries.append(FactoryModel(f"ipadapter/{variant.stem}{ext}",
                                        lambda v=variant, s=seed: ipadapters.adapter_state_dict(v, s),
                                        heavy=ext == ".safetensors" and variant.base != "sd15"))
        if variant.base == "sd15":  # the same layout over the tiny UNet's four 320-wide layers
            entries.append(FactoryModel(f"ipadapter/tiny_{variant.stem}.bin",
                                        lambda v=variant, s=seed: ipadapters.adapter_state_dict(v, s, TINY_SD15_WIDTHS),
                                        (f"{variant.stem}.safetensors", f"{variant.stem}.bin")))
    return {e.name: e for e in entries}


HQ_EDIT_FILE = "diffusion_pytorch_model.safetensors"  # a diffusers UNet folder's weights file
FLUX_FILE = "flux1_layout.pt"
INSTANTX_FLUX_FILE = "flux1_layout_FLUX.1-dev-IP-Adapter.bin"  # FLUX.1-dev's layout with 2 double- and 1 single-stream blocks
# Cross-attention widths of the tiny SD1.5 UNet in adapter order (input 1, output 0, output 1, middle).
TINY_SD15_WIDTHS = (320, 320, 320, 320)
CATALOGUE = _catalogue()
LIGHT_SET = ("checkpoints/tiny_sd15.ckpt", "checkpoints/tiny_sd15_ip2p.ckpt", "controlnet/tiny_sd15_controlnet.pth",
             "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt", "ipadapter/tiny_ip-adapter-plus_sd15.bin")


def factory_key() -> str:
    """Hash of this package's code: the cache folder changes whenever a builder does."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def models_dir() -> Path:
    return comfy_host.cache_root() / f"models-{factory_key()}"


def _prune_stale_caches(current: Path) -> None:
    """Remove model folders built by earlier versions of the factory (they are never read again)."""
    for stale in current.parent.glob("models-*"):
        if stale != current and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def write_state_dict(state_dict: dict, path: Path) -> None:
    """``torch.save`` for pickle formats (pool views stay shared: small files); safetensors gets
    contiguous copies, with grouped entries flattened as ``<group>.<key>``."""
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        flat = {}
        for key, value in state_dict.items():
            if isinstance(value, dict):  # grouped adapter files are flattened as "<group>.<key>"
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in flat.items()}, str(tmp))
    else:
        torch.save(state_dict, tmp)
    os.replace(tmp, path)


def ensure(*names: str) -> Path:
    """Build the named factory files that are missing and return the models folder."""
    root = models_dir()
    if not root.exists():
        _prune_stale_caches(root)
    for name in names:
        model = CATALOGUE[name]
        path = root / name
        if not path.exists():
            # the builders read the host's model classes; a host first configured here gets this models folder
            comfy_host.import_host(models_dir=root, load_nodes=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_state_dict(model.build(), path)
    return root


def stand_in(folder: str, real_name: str) -> str | None:
    """The factory file name that replaces ``real_name`` in ``folder`` (a tiny stand-in where there is
    one, else a file of that very name), or None."""
    files = {m.name.split("/", 1)[1]: m for m in CATALOGUE.values() if m.name.startswith(folder + "/")}
    stand_ins = [file_name for file_name, model in files.items() if real_name in model.stands_for]
    return stand_ins[0] if stand_ins else (real_name if real_name in files else None)
