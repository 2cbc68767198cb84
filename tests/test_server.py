"""The headless host serves this pack over HTTP and runs workflows end to end."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from tools import comfy_host
from tools.run_example import DEFAULT_WORKFLOW, map_to_stand_ins

pytestmark = pytest.mark.server


def test_server_loads_the_pack_without_import_errors(server):
    log = server.log_path.read_text(errors="replace")
    pack_lines = [line for line in log.splitlines() if f"custom_nodes/{comfy_host.PACK_DIR_NAME}" in line]
    assert pack_lines, "the host never mentioned the pack while loading custom nodes"
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in pack_lines), "\n".join(pack_lines)
    assert server.get_json("/system_stats")["system"]["comfyui_version"]


def test_example_workflow_produces_an_image(server):
    prompt, _ = map_to_stand_ins(json.loads(DEFAULT_WORKFLOW.read_text()))
    prompt["5"]["inputs"]["steps"] = 2
    entry = server.run_prompt(prompt)
    files = server.output_files(entry)
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (256, 256)


def test_missing_model_file_is_refused_and_the_server_keeps_serving(server):
    prompt, _ = map_to_stand_ins(json.loads(DEFAULT_WORKFLOW.read_text()))
    prompt["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(comfy_host.PromptRejected) as refused:
        server.run_prompt(prompt)
    assert refused.value.status == 400 and "no_such_model.safetensors" in refused.value.body
    assert server.get_json("/system_stats")["system"]["comfyui_version"]
