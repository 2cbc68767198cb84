"""Graphs on a headless server: what the editor queues for a UI graph, quicker example workflows, runs that check the
images they save, and the check that an adapter acted (its images against the bare model's and our nodes')."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from PIL import Image

from ipadapter_core.migrate import migrate
from support.cubiq import SIZE
from tools import comfy_host
from tools.run_example import USERS_MODELS_ONLY, copy_example_images, map_to_stand_ins, needs_full_size_models
from tools.workflow_ui import UPLOAD_VALUE, is_widget, ordered_inputs

SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
# The least mean change of the saved images (0..255) that counts as the adapter acting: on the tiny models the
# graphs here change them by 0.6 to 4.1; an adapter that does nothing leaves them bit-identical.
ADAPTER_EFFECT = 0.25


def ui_to_api(graph: dict, object_info: dict) -> dict:
    """The API prompt the editor queues for a UI graph: links by input name, reroutes followed, each link checked from
    both ends and by type; widget values by the host's input order, without the frontend's extra values (a seed's
    control_after_generate mode, the upload button's), the missing last ones (an older save) at their defaults, none
    left over."""
    nodes, links = {node["id"]: node for node in graph["nodes"]}, {link[0]: link for link in graph["links"]}

    def source(link_id: int, input_type: str) -> list:
        _, origin, origin_slot, _, _, link_type = links[link_id]
        origin_node = nodes[origin]
        assert link_id in origin_node["outputs"][origin_slot]["links"], f"link {link_id} is not listed by its origin"
        if origin_node["type"] == "Reroute":
            return source(origin_node["inputs"][0]["link"], input_type)
        assert link_type == object_info[origin_node["type"]]["output"][origin_slot] == input_type, \
            f"link {link_id} ({link_type}) joins an output and an input of other types"
        return [str(origin), origin_slot]

    prompt = {}
    for node in graph["nodes"]:
        if node["type"] == "Reroute":
            continue
        inputs = {}
        for slot, entry in enumerate(node["inputs"]):
            if entry.get("link") is None:
                continue
            _, _, _, target, target_slot, _ = links[entry["link"]]
            assert (target, target_slot) == (node["id"], slot), f"link {entry['link']} does not end at its input"
            inputs[entry["name"]] = source(entry["link"], entry["type"])
        values = list(node.get("widgets_values") or [])
        for name, spec, _ in ordered_inputs(object_info[node["type"]]):
            if not is_widget(spec):
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if values:
                value = values.pop(0)
            else:
                value = options.get("default", (kind if isinstance(kind, list) else options.get("options", [None]))[0])
            if options.get("control_after_generate") and values:
                assert values.pop(0) in SEED_CONTROLS
            if options.get("image_upload"):
                assert values.pop() == UPLOAD_VALUE
            inputs.setdefault(name, value)  # a widget given by a link keeps the link
        assert values == [], f"node {node['id']}: widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def quick(prompt: dict, steps: int, side: int | None = None) -> dict:
    """The workflow with fewer sampling steps (and a smaller empty latent): the models are random anyway."""
    for node in prompt.values():
        if isinstance(node["inputs"].get("steps"), int):
            node["inputs"]["steps"] = steps
        if side and node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=side, height=side)
    return prompt


def workflow_param(name: str):
    """A workflow file name as a test parameter: those on full-size stand-ins (SDXL: a 2.6 B UNet, 10 GB in
    float32) are heavy, each run in its own process."""
    heavy = name not in USERS_MODELS_ONLY and needs_full_size_models(name)
    return pytest.param(name, id=name, marks=[pytest.mark.heavy] if heavy else [])


def fresh_prefixes(prompt: dict) -> dict:
    """``prompt`` with a prefix of its own for each SaveImage: a prompt the server just ran comes from its cache and
    saves no image."""
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] += f"_{uuid.uuid4().hex[:8]}"
    return prompt


def run_images(server, prompt: dict, count: int = 1) -> list:
    """Run ``prompt`` on its stand-in models: it saves ``count`` images of SIZE x SIZE; their paths."""
    prompt, _ = map_to_stand_ins(prompt)
    files = server.output_files(server.run_prompt(prompt))
    assert len(files) == count
    sizes = []
    for path in files:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sizes == [(SIZE, SIZE)] * count
    return files


def pixels(files) -> np.ndarray:
    """The images at ``files`` as one float array [count, height, width, RGB] in 0..255."""
    arrays = []
    for path in files:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    return np.stack(arrays)


def bare_branch(prompt: dict) -> dict:
    """The sampling of ``prompt`` on the checkpoint's own model: its KSampler and the nodes after it, copied under keys
    "bare_<key>", the copy's model the checkpoint loader's (to run beside ``prompt`` or its migration)."""
    (checkpoint,) = [key for key, node in prompt.items() if node["class_type"] == "CheckpointLoaderSimple"]
    (sampler,) = [key for key, node in prompt.items() if node["class_type"] == "KSampler"]
    after = {sampler}
    while grown := {key for key, node in prompt.items() if key not in after and any(
            isinstance(value, list) and value[:1] and value[0] in after for value in node["inputs"].values())}:
        after |= grown
    branch = {}
    for key in after:
        inputs = {name: [f"bare_{value[0]}", value[1]] if isinstance(value, list) and value[0] in after else value
                  for name, value in prompt[key]["inputs"].items()}
        branch[f"bare_{key}"] = {"class_type": prompt[key]["class_type"], "inputs": inputs}
    branch[f"bare_{sampler}"]["inputs"]["model"] = [checkpoint, 0]
    return branch


def assert_adapter_acted(server, prompt: dict, files, compare_ours: bool = True) -> None:
    """The images ``prompt`` saved (``files``, from run_images) are not the bare model's (the same sampling on the
    checkpoint's own model) and, with ``compare_ours``, are those of the same graph migrated to our nodes: one more
    run, of the bare sampling (beside the migrated graph), its other nodes from the server's cache."""
    posted, _ = map_to_stand_ins(prompt)
    beside = migrate(posted)[0] if compare_ours else {
        key: node for key, node in posted.items() if node["class_type"] != "SaveImage"}
    again = fresh_prefixes({**beside, **bare_branch(posted)})
    outputs = server.run_prompt(again)["outputs"]
    saved = {key: pixels(server.output_files({"outputs": {key: outputs[key]}})) for key, node in again.items()
             if node["class_type"] == "SaveImage"}
    bare = saved.pop(next(key for key in saved if key.startswith("bare_")))
    images = pixels(files)
    assert images.shape == bare.shape and np.abs(images - bare).mean() > ADAPTER_EFFECT, \
        f"the adapter changed the bare model's images by {np.abs(images - bare).mean():.3f} levels on average"
    if compare_ours:
        (ours,) = saved.values()
        assert np.array_equal(images, ours), "that pack's node ids gave other images than our nodes"


def run_on_the_full_sd15_layout(prompt: dict, base, models_dir) -> None:
    """``prompt`` (from api_style_composition) on the full-size SD1.5 layouts, 1 step, a batch of 2 at 64 px,
    on a server of its own: it saves 2 images."""
    prompt, _ = map_to_stand_ins(prompt)
    prompt["ckpt"]["inputs"]["ckpt_name"] = "sd15_layout.ckpt"
    prompt["adp"]["inputs"]["ipadapter_file"] = "ip-adapter-plus_sd15.bin"  # the real 16-layer layout
    prompt["lat"]["inputs"].update(width=64, height=64, batch_size=2)  # the batch node: image i to latent i
    prompt["ks"]["inputs"]["steps"] = 1
    server = comfy_host.HostServer(base, models_dir=models_dir)
    copy_example_images(server.base_dir / "input")
    with server:
        files = server.output_files(server.run_prompt(prompt))
    assert len(files) == 2
    for path in files:
        with Image.open(path) as image:
            assert image.size == (64, 64)
