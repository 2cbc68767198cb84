"""Every input of every node id the pack registers, ours and the compatible ids, tried with hostile values generated
from the served schema (support.hostile_values) through one server, against one rule: a prompt is refused naming
the input, or fails before sampling with an error naming an input (never a bare Python exception, never advice to
turn a protection off), or runs and saves images that are not black; the server stays up and the node's carrier
prompt runs again after its cases. The run writes docs/hostile-inputs.md (on the pinned host)."""
from __future__ import annotations

import collections
import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.soak import base_prompt, prompt_mix
from support.cubiq import UI_GRAPHS
from support.cubiq_prompts import API_GRAPHS, write_saved_embeds
from support.graphs import fresh_prefixes, quick, ui_to_api
from support.hostile_values import SEED, hostile_cases, schema_inputs
from tools import comfy_host
from tools.run_example import map_to_stand_ins

pytestmark = pytest.mark.server
REPORT = Path(__file__).resolve().parent.parent / "docs" / "hostile-inputs.md"
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
PACK_CATEGORY = "image_prompt"
BARE = ("IndexError", "KeyError", "AttributeError", "TypeError", "ZeroDivisionError", "UnboundLocalError",
        "NameError", "AssertionError", "RecursionError")
FULL = "ImagePromptApplyAdvanced"  # the node that also gets the valid (slow) values: see hostile_values.ACCEPTED
ADVICE = ("weights_only set to False", "weights_only=False", "Re-running `torch.load`")
# Node ids no carrier here can run, and why (each is tried by its own tests).
NOT_REACHED = {
    "ImagePromptInsightFaceLoader": "needs the insightface library, not installed here (issue 35)",
    "IPAdapterInsightFaceLoader": "needs the insightface library, not installed here (issue 35)",
    "IPAdapterFaceID": "finds faces with insightface, not installed here (issue 35)",
    "IPAAdapterFaceIDBatch": "finds faces with insightface, not installed here (issue 35)",
    "IPAdapterFaceIDKolors": "finds faces with insightface, not installed here (issue 35)",
    "IPAdapterUnifiedLoaderFaceID": "its FaceID adapters find faces with insightface, not installed here (issue 35); "
                                    "ours, ImagePromptUnifiedLoaderFaceID, is reached",
    "IPAdapterUnifiedLoaderCommunity": "its presets (Composition, Kolors) need the full SD1.5 or SDXL layout",
    **{node: "block maps need the full SD1.5 or SDXL attention layout (heavy models, tested in their own process)"
       for node in ("ImagePromptStyleComposition", "IPAdapterStyleComposition", "IPAdapterStyleCompositionBatch",
                    "IPAdapterPreciseStyleTransfer", "IPAdapterPreciseStyleTransferBatch",
                    "IPAdapterPreciseComposition", "IPAdapterPreciseCompositionBatch")},
    "InstructEditModelLoader": "loads a diffusers-format edit model folder, which the factory does not build",
    "ReferenceEditGuider": "guides FLUX.1 Kontext / Qwen-Image-Edit (DiT carriers sample for minutes on 2 cores)",
    "ReferenceLatentControls": "controls FLUX.1 Kontext / Qwen-Image-Edit (DiT carriers sample for minutes on 2 cores)",
}


def with_defaults(object_info: dict, class_type: str, **inputs) -> dict:
    """A node of ``class_type`` with ``inputs`` and every other widget at its default."""
    for name, (kind, options) in schema_inputs(object_info[class_type]).items():
        if name not in inputs and "default" in options:
            inputs[name] = options["default"]
        elif name not in inputs and kind == "COMBO":
            inputs[name] = object_info[class_type]["input"].get("required", {}).get(name, [[None]])[0][0]
    return {"class_type": class_type, "inputs": {k: v for k, v in inputs.items() if v is not None}}


def swapped(object_info: dict, class_type: str, prompt: dict | None = None, old: str = "ImagePromptApplyAdvanced",
            **extra) -> dict:
    """``prompt`` (the base prompt) with its node of class ``old`` replaced by ``class_type``, keeping the inputs
    they share."""
    prompt = prompt or base_prompt()
    (key,) = [key for key, node in prompt.items() if node["class_type"] == old]
    names = schema_inputs(object_info[class_type])
    kept = {k: v for k, v in prompt[key]["inputs"].items() if k in names}
    prompt[key] = with_defaults(object_info, class_type, **kept, **extra)
    return prompt


def our_carriers(object_info: dict) -> dict[str, dict]:
    """SD1.5 carriers for the nodes of ours that no example workflow holds."""
    def node(kind: str, **inputs) -> dict:
        return with_defaults(object_info, kind, **inputs)
    embeds = prompt_mix(0)
    embeds["c"] = node("ImagePromptCombineEmbeds", embed1=["12", 0], embed2=["12", 0], method="average")
    embeds["5"]["inputs"]["pos_embeds"] = ["c", 0]
    embeds["s"] = node("ImagePromptSaveEmbeds", embeds=["12", 0], filename_prefix="hostile/embeds")
    images = base_prompt()
    images["p"] = node("ImagePromptPrepImage", image=["4", 0])
    images["n"] = node("ImagePromptNoiseImage", image_optional=["4", 0])
    images["5"]["inputs"].update(image=["p", 0], image_negative=["n", 0])
    frames = base_prompt()
    frames["f"] = node("ImagePromptFrameWeights", weights="1, 0.5", frames=2, image=["4", 0])
    frames["g"] = node("ImagePromptFrameWeightsFromStrategy", weights_strategy=["f", 5], image=["4", 0])
    frames["w"] = node("ImagePromptCombineWeights", weights_1=["f", 0], weights_2=["g", 0])
    frames["sch"] = node("ImagePromptScheduleFromStrategy", weights_strategy=["f", 5], prompt="a house")
    frames["5"]["inputs"].update(weight=["w", 0], image=["f", 3], unfold_batch=True)
    frames["6"]["inputs"]["text"] = ["sch", 0]
    return {"advanced": base_prompt(), "apply": swapped(object_info, "ImagePromptApply"),
            "enhancer": swapped(object_info, "ImagePromptClipVisionEnhancer", enhance_tiles=2),
            "tiled": swapped(object_info, "ImagePromptTiled"), "embeds": embeds, "prep and noise": images,
            "frames": frames}


def carriers(object_info: dict) -> dict[str, dict]:
    """Prompts that run on the factory models, the cheapest first: ours, the SD1.5 example workflows, that pack's
    API and UI graphs."""
    found = our_carriers(object_info)
    for path in sorted(WORKFLOWS.glob("sd15_*.json")):
        found[path.stem] = json.loads(path.read_text())
    found.update({f"that pack's {name}": build() for name, build in sorted(API_GRAPHS.items())})
    found.update({f"that pack's {name} graph": ui_to_api(build(), object_info) for name, build in sorted(UI_GRAPHS.items())})
    for batch in ("IPAdapterTiledBatch", "IPAdapterClipVisionEnhancerBatch"):
        found[f"that pack's advanced graph with {batch}"] = swapped(
            object_info, batch, copy.deepcopy(found["that pack's advanced graph"]), old="IPAdapterAdvanced")
    return {name: fresh_prefixes(quick(map_to_stand_ins(prompt)[0], steps=1, side=64)) for name, prompt in found.items()}


def plain_prompt() -> dict:
    """A good prompt that does not run the pack's nodes (text to image on the tiny SD1.5): the next one after a
    node's cases."""
    prompt = {key: node for key, node in base_prompt().items() if key in ("1", "6", "7", "8", "9", "10", "11")}
    prompt["9"]["inputs"]["model"] = ["1", 0]
    return prompt


def pack_ids(object_info: dict) -> list[str]:
    return sorted(i for i, info in object_info.items() if info.get("category", "").startswith(PACK_CATEGORY))


def judge(server, prompt: dict, case, names: set[str]) -> tuple[str, str]:
    """(outcome, reason it breaks the rule or "") for one hostile prompt."""
    named = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    try:
        entry = server.run_prompt(prompt)
    except comfy_host.PromptRejected as refused:
        body = refused.body
        return "refused when queued", "" if case.input in body else f"refused without naming {case.input}: {body[:300]}"
    except comfy_host.PromptFailed as failed:
        details = [m[1] for m in failed.entry["status"]["messages"] if m[0] == "execution_error"][0]
        message, kind = failed.message, details.get("exception_type", "")
        names_it = re.search(rf"\b{re.escape(case.input)}\b", message) or \
            (failed.node_type == case.class_type and named.search(message))
        if kind.rsplit(".", 1)[-1] in BARE or not names_it:
            return "failed", f"a bare or unnamed error in {failed.node_type}: {kind}: {message[:300]}"
        if any(text in message for text in ADVICE):
            return "failed", f"advises turning a protection off: {message[:300]}"
        return "failed with a named error", ""
    if entry["node_errors"]:  # the host left out the outputs behind the refused node and ran the others
        errors = json.dumps(entry["node_errors"])
        return "refused when queued", "" if case.input in errors else f"refused without naming {case.input}: {errors[:300]}"
    for path in server.output_files(entry):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.max() == 0:
            return "ran", f"reported success with an all-black image ({path.name})"
    return "ran, images not black", ""


def report(rows: list[tuple], host_version: str) -> str:
    by_kind = collections.defaultdict(collections.Counter)
    by_node = collections.Counter()
    for case, outcome in rows:
        by_kind[case.kind][outcome] += 1
        by_node[case.class_type] += 1
    outcomes = ["refused when queued", "failed with a named error", "ran, images not black"]
    lines = ["# Hostile inputs", "",
             "Written by the schema-driven hostile run (`tests/test_hostile_schema.py`; to rewrite this page: "
             "`IMAGE_PROMPT_WRITE_HOSTILE_REPORT=1 .venv/bin/python -m pytest tests/test_hostile_schema.py`), "
             f"on ComfyUI {host_version}, seed {SEED}: {len(rows)} prompts in {len(by_node)} node ids. The values come "
             "from each input's type in the served schema (`tests/support/hostile_values.py`). Every prompt met the "
             "rule: refused naming the input, failed before sampling naming an input, or ran with images that are "
             "not black; the server stayed up and a good prompt ran after each node's cases. The valid values that run "
             f"the whole prompt (one-pixel masks, batches of three) are tried on `{FULL}` only.", "",
             "Valid results where a value runs: a text prompt takes any text; a mask of another size than the "
             "latent or the image is stretched to it (the inputs' tooltips say so); a batch of masks gives mask i "
             "to frame i; a batch of reference images is used together (or one per frame, unfolded).", "",
             "| class of value | prompts | " + " | ".join(outcomes) + " |", "|---|---:|" + "---:|" * len(outcomes)]
    for kind in sorted(by_kind):
        counts = by_kind[kind]
        lines.append(f"| {kind} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in outcomes) + " |")
    ran = sorted({f"`{case.class_type}.{case.input}` = {case.value}" for case, outcome in rows
                  if outcome.startswith("ran") and case.class_type != FULL})
    lines += ["", "Values that ran elsewhere (each input then ignores the value or takes it as valid):", ""]
    lines += [f"- {line}" for line in ran]
    lines += ["", "| node id | prompts |", "|---|---:|"]
    lines += [f"| `{node}` | {count} |" for node, count in sorted(by_node.items())]
    lines += ["", "Not reached by this run (no carrier runs here):", ""]
    lines += [f"- `{node}`: {why}" for node, why in sorted(NOT_REACHED.items())]
    return "\n".join(lines) + "\n"


def test_every_input_of_every_node_meets_the_rule_with_hostile_values(server, need_models):
    object_info = server.get_json("/object_info")
    write_saved_embeds(server.base_dir / "input")
    prompts = carriers(object_info)
    for prompt in prompts.values():
        need_models(*map_to_stand_ins(prompt)[1])
    chosen = {}
    for name, prompt in prompts.items():
        for key, node in prompt.items():
            if node["class_type"] in object_info and node["class_type"] not in chosen and \
                    object_info[node["class_type"]].get("category", "").startswith(PACK_CATEGORY):
                chosen[node["class_type"]] = (name, key)
    ids = pack_ids(object_info)
    assert set(ids) - set(chosen) - set(NOT_REACHED) == set(), "node ids without a carrier"
    rows, broken = [], []
    for class_type in sorted(set(chosen) - set(NOT_REACHED)):
        name, key = chosen[class_type]
        carrier = prompts[name]
        names = {input_name for node in carrier.values() if node["class_type"] in ids
                 for input_name in schema_inputs(object_info[node["class_type"]])}
        for case in hostile_cases(carrier, key, object_info[class_type], full=class_type == FULL):
            outcome, why = judge(server, fresh_prefixes(case.prompt(carrier)), case, names | {case.input})
            rows.append((case, outcome))
            if why:
                broken.append(f"{class_type}.{case.input} = {case.value} ({name}): {why}")
            assert server.process.poll() is None, f"the server died on {class_type}.{case.input} = {case.value}"
        assert server.output_files(server.run_prompt(fresh_prefixes(plain_prompt())))
    assert not broken, f"{len(broken)} of {len(rows)} prompts break the rule:\n" + "\n".join(broken)
    text = report(rows, server.get_json("/system_stats")["system"].get("comfyui_version", "?"))
    if os.environ.get("IMAGE_PROMPT_WRITE_HOSTILE_REPORT"):
        REPORT.write_text(text)
    elif not os.environ.get("COMFYUI_PATH"):
        assert REPORT.read_text() == text, "docs/hostile-inputs.md is stale: rerun with IMAGE_PROMPT_WRITE_HOSTILE_REPORT=1"
