"""The main job: a headless ComfyUI with this pack runs an example workflow through its HTTP API.

    python -m tools.run_example                       # built-in random-weight models (tiny, real layouts)
    python -m tools.run_example --models ~/ComfyUI/models   # your own models folder
    python -m tools.run_example --workflow workflows/api/OTHER.json

The default workflow steers SD1.5 with a reference image (IP-Adapter Plus) and its Canny edges
(ControlNet). With the built-in models, the real file names in the workflow (v1-5-pruned-emaonly.safetensors,
ip-adapter-plus_sd15.safetensors, ...) are mapped to the factory models that stand in for them; their
images are noise by design. With --models, your folder must hold those files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ipadapter_core.migrate import MigrationTable
from ipadapter_core.presets import FACEID_PRESETS, PRESETS, PUBLISHED

from . import comfy_host, factory

WORKFLOWS = comfy_host.REPO_ROOT / "workflows"
DEFAULT_WORKFLOW = WORKFLOWS / "api" / "sd15_ipadapter_controlnet.json"
EXAMPLE_IMAGES = WORKFLOWS / "images"

# Loader nodes, the input that names a model file, and the host models folder it lists.
MODEL_INPUTS = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
    "CLIPVisionLoader": ("clip_name", "clip_vision"),
    "ImagePromptAdapterLoader": ("ipadapter_file", "ipadapter"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "VAELoader": ("vae_name", "vae"),
    "CLIPLoader": ("clip_name", "text_encoders"),
}
# Loader nodes the built-in models replace by another node. Flux's and SD3.5's text encoders: the host builds T5-XXL
# at its one size (4.7 B parameters, 19 GB in float32), so the stand-in is CLIP-L alone, loaded as SD3 loads it
# without T5 and CLIP-G (its tokens zero-padded to T5's 4096 channels, its pooled output first in the pooled
# vector): the inputs Flux and SD3 read, in the shapes they read them.
NODE_STAND_INS = {("DualCLIPLoader", "flux"): lambda inputs: {"class_type": "CLIPLoader",
                                                              "inputs": {"clip_name": inputs["clip_name2"], "type": "sd3",
                                                                         "device": "default"}},
                  ("TripleCLIPLoader", None): lambda inputs: {"class_type": "CLIPLoader",
                                                              "inputs": {"clip_name": inputs["clip_name1"], "type": "sd3",
                                                                         "device": "default"}}}


# Example workflows no built-in model can run, and why: they need the user's models folder (--models).
USERS_MODELS_ONLY = {
    "qwen_image_edit_two_references.json": "Qwen-Image-Edit's text encoder is Qwen2.5-VL-7B, which the host builds at its "
                                           "one size (7 B parameters, 30 GB in float32), with no smaller stand-in",
}


# Real files whose stand-in is a full-size factory layout (built on demand, not named by the factory itself).
FULL_SIZE_STAND_INS = {("checkpoints", "sd_xl_base_1.0.safetensors"): "sdxl_layout.ckpt"}


def stand_in(folder: str, real_name: str) -> str | None:
    """The factory file standing in for ``folder/real_name``, or None."""
    return FULL_SIZE_STAND_INS.get((folder, real_name)) or factory.stand_in(folder, real_name)


PRESET_LOADERS = {"ImagePromptUnifiedLoader": PRESETS, "ImagePromptUnifiedLoaderFaceID": FACEID_PRESETS}


def as_our_node(table: MigrationTable, class_type: str, preset) -> tuple[str, object]:
    """Our node type and preset name for a node of ours or one of ComfyUI_IPAdapter_plus's ids."""
    rule = table.nodes.get(class_type)
    if rule is None or rule["to"] is None:
        return class_type, preset
    names = table.option_maps.get(rule.get("maps", {}).get("preset"), {})
    return rule["to"], names.get(preset, preset) if isinstance(preset, str) else preset


def map_to_stand_ins(prompt: dict) -> tuple[dict, set[str]]:
    """Replace real model file names by the factory files standing in for them (in our nodes and in
    ComfyUI_IPAdapter_plus's node ids), and the loaders of NODE_STAND_INS by the nodes that load their stand-ins.

    Returns the mapped prompt and the factory files it needs (``"<folder>/<file>"``)."""
    mapped = json.loads(json.dumps(prompt))
    needed = set()
    table = MigrationTable.load()
    for node_id, node in mapped.items():
        replace = NODE_STAND_INS.get((node["class_type"], node.get("inputs", {}).get("type")))
        if replace:  # keeps the node id: its outputs stay linked
            mapped[node_id] = node = {**node, **replace(node["inputs"])}
        kind, preset = as_our_node(table, node["class_type"], node.get("inputs", {}).get("preset"))
        presets = PRESET_LOADERS.get(kind)
        if presets:  # the loader finds its file by its weights: build the (SD1.5) stand-in the preset means
            variant = presets.get(preset, {}).get("sd15")
            stand_in_name = variant and stand_in("ipadapter", PUBLISHED[variant].file)
            if stand_in_name:
                needed.add(f"ipadapter/{stand_in_name}")
            continue
        key, folder = MODEL_INPUTS.get(kind, (None, None))
        value = node.get("inputs", {}).get(key)
        if not isinstance(value, str):
            continue
        stand_in_name = stand_in(folder, value)
        if stand_in_name is None:
            raise KeyError(f"node {node_id} ({node['class_type']}): no built-in model stands in for "
                           f"{folder}/{value}; run with --models DIR to use your own files")
        node["inputs"][key] = stand_in_name
        needed.add(f"{folder}/{stand_in_name}")
    return mapped, needed


def needs_full_size_models(workflow: str) -> bool:
    """Does the API workflow ``workflow`` (a file name in workflows/api) need full-size stand-ins (gigabytes)?"""
    _, needed = map_to_stand_ins(json.loads((WORKFLOWS / "api" / workflow).read_text()))
    return any(factory.CATALOGUE[name].heavy for name in needed)


def copy_example_images(input_dir: Path) -> None:
    """Put the example workflows' input images where LoadImage finds them."""
    for image in EXAMPLE_IMAGES.iterdir():
        shutil.copyfile(image, input_dir / image.name)


def run(workflow: Path, models: Path | None, base_dir: Path) -> list[Path]:
    prompt = json.loads(workflow.read_text())
    if models is None and workflow.name in USERS_MODELS_ONLY:
        raise SystemExit(f"{workflow.name} needs your own models (--models DIR): {USERS_MODELS_ONLY[workflow.name]}")
    if models is None:
        prompt, needed = map_to_stand_ins(prompt)
        models = factory.ensure(*sorted(needed))
    server = comfy_host.HostServer(base_dir, models_dir=models)
    copy_example_images(server.base_dir / "input")
    with server:
        started = time.monotonic()
        entry = server.run_prompt(prompt)
        files = server.output_files(entry)
        print(f"{workflow.name}: {len(files)} image(s) in {time.monotonic() - started:.1f} s "
              f"on ComfyUI at {comfy_host.host_root()}")
    return files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="a ComfyUI models folder (default: the built-in test models)")
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="an API-format workflow JSON")
    parser.add_argument("--base-dir", type=Path, default=comfy_host.cache_root() / "example-run",
                        help="the host's base directory (input, output, user); default: in the cache")
    args = parser.parse_args(argv)
    files = run(args.workflow, args.models, args.base_dir)
    for path in files:
        print(path)
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
