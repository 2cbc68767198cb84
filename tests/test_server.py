"""The headless host serves this pack over HTTP and runs its example workflows end to end."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from tools import comfy_host
from tools.run_example import DEFAULT_WORKFLOW, WORKFLOWS, map_to_stand_ins

pytestmark = pytest.mark.server


def api_workflow(name: str, steps: int = 2) -> dict:
    prompt, _ = map_to_stand_ins(json.loads((WORKFLOWS / "api" / name).read_text()))
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return prompt


def test_server_loads_the_pack_and_lists_its_nodes(server):
    log = server.log_path.read_text(errors="replace")
    pack_lines = [line for line in log.splitlines() if f"custom_nodes/{comfy_host.PACK_DIR_NAME}" in line]
    assert pack_lines, "the host never mentioned the pack while loading custom nodes"
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in pack_lines), "\n".join(pack_lines)
    info = server.get_json("/object_info/ImagePromptAdapterLoader")["ImagePromptAdapterLoader"]
    kind, *options = info["input"]["required"]["ipadapter_file"]
    assert "tiny_ip-adapter-plus_sd15.bin" in (options[0]["options"] if kind == "COMBO" else kind)
    assert info["python_module"] == f"custom_nodes.{comfy_host.PACK_DIR_NAME}"


@pytest.mark.parametrize("workflow", [DEFAULT_WORKFLOW.name, "sd15_text_to_image.json"])
def test_example_workflow_produces_an_image(server, workflow):
    entry = server.run_prompt(api_workflow(workflow))
    files = server.output_files(entry)
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (256, 256)


def test_missing_model_file_is_refused_and_the_server_keeps_serving(server):
    prompt = api_workflow(DEFAULT_WORKFLOW.name)
    prompt["6"]["inputs"]["ipadapter_file"] = "no_such_adapter.safetensors"
    with pytest.raises(comfy_host.PromptRejected) as refused:
        server.run_prompt(prompt)
    assert refused.value.status == 400 and "no_such_adapter.safetensors" in refused.value.body
    server.run_prompt(api_workflow("sd15_text_to_image.json", steps=1))


def test_sdxl_adapter_on_an_sd15_model_fails_with_a_clear_message(server, need_models):
    need_models("ipadapter/ip-adapter_sdxl.bin")
    prompt = api_workflow(DEFAULT_WORKFLOW.name)
    prompt["6"]["inputs"]["ipadapter_file"] = "ip-adapter_sdxl.bin"
    with pytest.raises(comfy_host.PromptFailed) as failed:
        server.run_prompt(prompt)
    assert failed.value.node_type == "ImagePromptApply"
    assert "ip-adapter_sdxl.bin is a SDXL IP-Adapter (70 cross-attention layers" in failed.value.message
    assert "but the model is an SD1.5 UNet" in failed.value.message
    server.run_prompt(api_workflow("sd15_text_to_image.json", steps=1))
