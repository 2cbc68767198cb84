"""The example workflows: every API workflow runs on the headless host with the factory models, every UI
graph is its API twin (read back with the host's own widget order), and the host lists them as templates."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.graphs import fresh_prefixes, quick, ui_to_api, workflow_param
from tools import comfy_host, node_reference
from tools.comfy_host import REPO_ROOT
from tools.run_example import MODEL_INPUTS, USERS_MODELS_ONLY, WORKFLOWS, map_to_stand_ins
from tools.workflow_ui import with_defaults

pytestmark = pytest.mark.server

API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
BUILT_IN_RUNS = [p for p in API_FILES if p.name not in USERS_MODELS_ONLY]
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def expected_images(prompt: dict) -> tuple[int, tuple[int, int]]:
    """How many images the workflow saves and their size: from its empty latent, else its 256 px input images."""
    latents = [n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage"]
    if latents:
        return latents[0]["batch_size"], (latents[0]["width"], latents[0]["height"])
    return 1, (256, 256)


def run_workflow(server, need_models, name: str, steps: int = 1, side: int | None = 128):
    prompt, needed = map_to_stand_ins(json.loads((WORKFLOWS / "api" / name).read_text()))
    need_models(*needed)
    prompt = fresh_prefixes(quick(prompt, steps, side))
    entry = server.run_prompt(prompt)
    return prompt, entry, server.output_files(entry)


def check_images(prompt: dict, files) -> list[np.ndarray]:
    count, size = expected_images(prompt)
    assert len(files) == count
    pixels = []
    for path in files:
        with Image.open(path) as image:
            assert image.size == size
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32))
        assert pixels[-1].std() > 1.0, f"{path.name} is a flat colour"
    return pixels


@pytest.mark.parametrize("name", [workflow_param(p.name) for p in BUILT_IN_RUNS])
def test_api_workflow_runs_and_saves_its_images(server, need_models, name):
    prompt, _, files = run_workflow(server, need_models, name)
    pixels = check_images(prompt, files)
    if name == "sd15_ipadapter_variation.json":
        assert np.abs(pixels[0] - pixels[1]).mean() > 1.0, "the two variations are the same image"
    if name == "sd15_ipadapter_inpaint.json":  # outside the mask the original is pasted back unchanged
        with Image.open(WORKFLOWS / "images" / "mask_house.png") as mask, \
                Image.open(WORKFLOWS / "images" / "reference.png") as original:
            keep = np.asarray(mask.convert("L")) == 0
            original = np.asarray(original.convert("RGB"), dtype=np.float32)
        assert np.abs(pixels[0][keep] - original[keep]).max() <= 1.0
        assert np.abs(pixels[0][~keep] - original[~keep]).mean() > 5.0, "the masked area was not repainted"
    if name == "flux_kontext_reference_controls.json":
        assert_reference_controls_acted(server, prompt, pixels[0])


def assert_reference_controls_acted(server, prompt: dict, controlled: np.ndarray) -> None:
    """The Kontext example's second reference, read at 0.7 on the left half until 80 %: its image is not that of
    the same graph without the controls, and at strength 0 the graph gives the image without that reference."""
    def variant(node: str, key: str, value) -> np.ndarray:
        again = json.loads(json.dumps(prompt))
        again[node]["inputs"][key] = value
        (image,) = check_images(again, server.output_files(server.run_prompt(fresh_prefixes(again))))
        return image
    plain = variant("13", "conditioning", ["10", 0])
    assert np.abs(controlled - plain).mean() > 0.5, "the controls did not change the edit"
    without_second = variant("13", "conditioning", ["7", 0])
    assert np.abs(plain - without_second).mean() > 0.5, "the second reference does nothing here"
    off = variant("12", "strength", 0.0)
    assert np.abs(off - without_second).max() <= 1.0, "strength 0 is not the graph without the reference"


@pytest.mark.parametrize("name", sorted(USERS_MODELS_ONLY))
def test_a_workflow_for_the_users_models_only_says_so(name, tmp_path):
    """Its models have no built-in stand-in: mapping names the loader and the --models way, and the example runner
    stops before starting a host, with the reason."""
    with pytest.raises(KeyError, match="no built-in model stands in for .*run with --models DIR"):
        map_to_stand_ins(json.loads((WORKFLOWS / "api" / name).read_text()))
    refused = subprocess.run([sys.executable, "-m", "tools.run_example", "--workflow", str(WORKFLOWS / "api" / name)],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert refused.returncode != 0 and USERS_MODELS_ONLY[name] in refused.stderr


def test_sdxl_example_runs_on_the_full_size_sdxl_stand_ins():
    """The SDXL example's checkpoint (both text encoders in it), adapter and CLIP vision are full size."""
    _, needed = map_to_stand_ins(json.loads((WORKFLOWS / "api" / "sdxl_ipadapter_style_composition.json").read_text()))
    assert needed == {"checkpoints/sdxl_layout.ckpt", "ipadapter/ip-adapter-plus_sdxl_vit-h.safetensors",
                      "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt"}


def test_every_api_workflow_has_a_ui_twin_and_back():
    assert [p.name for p in UI_FILES] == [p.name for p in API_FILES]


@pytest.mark.parametrize("name", [p.name for p in UI_FILES])
def test_ui_graph_describes_the_same_graph_as_its_api_twin(server, name):
    graph = json.loads((WORKFLOWS / name).read_text())
    api = json.loads((WORKFLOWS / "api" / name).read_text())
    object_info = server.get_json("/object_info")
    assert graph["version"] == 0.4 and graph["last_node_id"] == max(n["id"] for n in graph["nodes"])
    assert ui_to_api(graph, object_info) == with_defaults(api, object_info)
    for node in graph["nodes"]:
        title = (api[str(node["id"])].get("_meta", {}).get("title") or object_info[node["type"]]["display_name"]
                 or node["type"])
        assert node["title"] == title
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in graph["nodes"]]
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
    assert not overlaps, "nodes drawn on top of each other"
    for _, origin, _, target, _, _ in graph["links"]:
        origin_x = next(n["pos"][0] for n in graph["nodes"] if n["id"] == origin)
        assert origin_x < next(n["pos"][0] for n in graph["nodes"] if n["id"] == target), "a link runs right to left"


def test_host_lists_the_ui_graphs_as_the_packs_templates(server):
    listed = server.get_json("/workflow_templates")
    assert sorted(listed[comfy_host.PACK_DIR_NAME]) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:
        url = f"{server.url}/api/workflow_templates/{comfy_host.PACK_DIR_NAME}/{path.name}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert json.loads(response.read()) == json.loads(path.read_text())


def test_api_client_script_uploads_runs_and_downloads(server, need_models, tmp_path):
    prompt, needed = map_to_stand_ins(json.loads((WORKFLOWS / "api" / "sd15_ipadapter_prompt.json").read_text()))
    need_models(*needed)
    upload = tmp_path / "client_upload.png"
    shutil.copyfile(WORKFLOWS / "images" / "reference.png", upload)
    prompt = quick(prompt, steps=1, side=128)
    next(n for n in prompt.values() if n["class_type"] == "LoadImage")["inputs"]["image"] = upload.name
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(prompt))
    client = [sys.executable, str(REPO_ROOT / "tools" / "api_client.py"), "--server", server.url]
    done = subprocess.run([*client, str(workflow), "--upload", str(upload), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    downloaded = [Path(line) for line in done.stdout.split()]
    assert len(downloaded) == 1 and downloaded[0].parent == tmp_path / "out"
    assert downloaded[0].read_bytes() == (server.base_dir / "output" / downloaded[0].name).read_bytes()
    assert (server.base_dir / "input" / upload.name).read_bytes() == upload.read_bytes()

    prompt["3"]["inputs"]["ipadapter_file"] = "no_such_adapter.safetensors"
    workflow.write_text(json.dumps(prompt))
    refused = subprocess.run([*client, str(workflow)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "no_such_adapter.safetensors" in refused.stderr


def test_workflows_page_names_every_workflow_and_the_model_files_it_uses():
    page = (REPO_ROOT / "docs" / "workflows.md").read_text()
    for path in API_FILES:
        for node in json.loads(path.read_text()).values():
            key = MODEL_INPUTS.get(node["class_type"], (None,))[0]
            if key in node["inputs"]:
                assert f"`{node['inputs'][key]}`" in page, f"{path.name}: docs/workflows.md does not list {node['inputs'][key]}"
        assert f"| `{path.stem}` |" in page, f"docs/workflows.md's workflow table does not list {path.stem}"


def test_docs_node_reference_is_the_live_hosts(server):
    assert node_reference.NODES_PAGE.read_text() == node_reference.page(server.get_json("/object_info")), \
        "docs/nodes.md is stale: run python -m tools.node_reference"
