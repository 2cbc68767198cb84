"""The instruction-edit example workflows run through the HTTP API of a headless host on the factory SD1.5
edit checkpoint (standing in for instruct-pix2pix-00-22000.safetensors), with ControlNet, IP-Adapter and a mask;
a masked edit leaves the pixels outside its mask as they were; a wrong model fails clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools import comfy_host
from tools.run_example import EXAMPLE_IMAGES, WORKFLOWS, map_to_stand_ins

pytestmark = pytest.mark.server

STEP_INPUTS = {"InstructEditSampler": "steps", "BasicScheduler": "steps"}


def edit_workflow(name: str, steps: int = 2) -> dict:
    prompt, _ = map_to_stand_ins(json.loads((WORKFLOWS / "api" / name).read_text()))
    for node in prompt.values():
        if node["class_type"] in STEP_INPUTS:
            node["inputs"][STEP_INPUTS[node["class_type"]]] = steps
    return prompt


@pytest.mark.parametrize("workflow", ["sd15_instruct_edit.json", "sd15_instruct_edit_guider.json",
                                      "sd15_instruct_edit_controlnet.json", "sd15_instruct_edit_ipadapter.json"])
def test_edit_workflow_produces_an_image(server, workflow):
    files = server.output_files(server.run_prompt(edit_workflow(workflow)))
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (256, 256)


def test_masked_edit_changes_only_the_masked_square(server):
    """The workflow masks the 128 px square at (64, 64) of the 256 px input and pastes the decoded edit back
    with the feathered mask the conditioning node returns."""
    files = server.output_files(server.run_prompt(edit_workflow("sd15_instruct_edit_masked.json")))
    with Image.open(files[0]) as edited, Image.open(EXAMPLE_IMAGES / "reference.png") as original:
        difference = np.abs(np.asarray(edited.convert("RGB"), int) - np.asarray(original.convert("RGB"), int)).max(-1)
    inside = np.zeros_like(difference, dtype=bool)
    inside[64:192, 64:192] = True
    assert difference[~inside].max() == 0
    assert difference[80:176, 80:176].mean() > 10  # the edit, in from the feathered edge


def test_a_text_to_image_checkpoint_fails_naming_what_to_load(server):
    prompt = edit_workflow("sd15_instruct_edit.json", steps=1)
    prompt["1"]["inputs"]["ckpt_name"] = "tiny_sd15.ckpt"
    with pytest.raises(comfy_host.PromptFailed) as failed:
        server.run_prompt(prompt)
    assert failed.value.node_type == "InstructEditSampler"
    assert "model: the connected model's UNet takes 4 input channels (a text-to-image model)" in failed.value.message
    assert "Load an InstructPix2Pix checkpoint instead" in failed.value.message
