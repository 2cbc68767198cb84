"""Graphs built with ComfyUI_IPAdapter_plus, written here in that pack's own formats, migrate to this pack's
nodes and run on the real headless host, where the adapter changes the image; a UI graph keeps every link;
migrating twice changes nothing; the report names what differs and what is not supported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ipadapter_core.migrate import MigrationTable, is_api_workflow, migrate, node_schema
from support.cubiq import (ADAPTER, CUBIQ, HOST, UI_GRAPH_IMAGES, UI_GRAPHS, CubiqGraph, graph_advanced,
                           graph_batch_weights, graph_embeds, graph_simple, graph_weights_strategy, sockets)
from support.cubiq_prompts import API_GRAPHS, api_faceid, api_node, api_style_composition, write_saved_embeds
from support.graphs import assert_adapter_acted, run_images, run_on_the_full_sd15_layout, ui_to_api
from tools import comfy_host
from tools.run_example import map_to_stand_ins

REPO = comfy_host.REPO_ROOT
# The node types the issue lists (those used in that pack's own example workflows).
ISSUE_TYPES = ("IPAdapter IPAdapterAdvanced IPAdapterUnifiedLoader IPAdapterUnifiedLoaderFaceID IPAdapterModelLoader "
               "IPAdapterInsightFaceLoader IPAdapterFaceID IPAdapterFaceIDKolors IPAdapterEmbeds IPAdapterEncoder "
               "IPAdapterCombineEmbeds IPAdapterBatch IPAdapterWeights IPAdapterTiled IPAdapterNoise "
               "IPAdapterStyleComposition IPAdapterPreciseComposition IPAdapterMS IPAdapterRegionalConditioning "
               "IPAdapterCombineParams IPAdapterFromParams PrepImageForClipVision IPAdapterClipVisionEnhancer").split()


def table() -> MigrationTable:
    return MigrationTable.load()


def links_by_id(workflow: dict) -> dict:
    return {link[0]: link for link in workflow["links"]}


def assert_links_consistent(workflow: dict) -> None:
    """Every link's two ends name it, and every socket's link exists (what the editor checks on load)."""
    nodes, links = {node["id"]: node for node in workflow["nodes"]}, links_by_id(workflow)
    for link_id, origin, origin_slot, target, target_slot, kind in links.values():
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"], (link_id, nodes[origin]["type"])
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, (link_id, nodes[target]["type"])
        assert kind in (nodes[origin]["outputs"][origin_slot]["type"], "*"), link_id
    for node in nodes.values():
        for slot in node["inputs"]:
            assert slot["link"] is None or slot["link"] in links
        for slot in node["outputs"]:
            assert all(link in links for link in slot["links"])


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


@pytest.fixture(scope="module")
def saved_by_that_pack(server):
    """The session's server with embeds files as that pack's Save Embeds wrote them in its input folder."""
    write_saved_embeds(server.base_dir / "input")
    return server


# --- the table ------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_table_has_every_node_of_that_pack_with_its_widget_order_inputs_and_outputs():
    nodes = table().nodes
    assert set(nodes) == set(CUBIQ)
    for kind, (inputs, widgets, outputs) in CUBIQ.items():
        rule = nodes[kind]
        assert [name for name, _ in rule["widgets"]] == widgets.split(), kind
        if rule["to"] is None:
            assert rule["unsupported"], kind
            continue
        assert rule["inputs"] == [name for name, _ in sockets(inputs)], kind
        assert len(rule["outputs"]) == len(sockets(outputs)), kind


@pytest.mark.unit
def test_every_node_type_of_the_issue_is_mapped_and_migrated_in_a_graph_here():
    nodes = table().nodes
    used = {node["type"] for build in UI_GRAPHS.values() for node in build()["nodes"]}
    used |= {node["class_type"] for build in API_GRAPHS.values() for node in build().values()}
    used |= {node["class_type"] for build in (api_style_composition, api_faceid) for node in build().values()}
    for kind in ISSUE_TYPES:
        assert nodes[kind]["to"] is not None, kind
    # these two need the insightface package to run; test_report_names_the_features_that_are_not_supported
    # migrates them
    assert set(ISSUE_TYPES) - used == {"IPAdapterFaceIDKolors", "IPAdapterInsightFaceLoader"}


@pytest.mark.server
def test_table_knows_our_nodes_as_the_host_serves_them(object_info):
    ours = table().ours
    missing = sorted(set(ours) - set(object_info))
    assert not missing, f"nodes the table maps to that the host does not serve: {missing}"
    for node_id, schema in ours.items():
        assert node_schema(object_info[node_id]) == schema, f"{node_id}: the table's schema is out of date"


# --- mapping and report -----------------------------------------------------------------------------------

def only_node(workflow: dict, kind: str) -> dict:
    (node,) = [node for node in workflow["nodes"] if node["type"] == kind]
    return node


def widget_map(node: dict) -> dict:
    names = [spec["name"] for spec in table().widgets(node["type"])]
    assert len(names) == len(node["widgets_values"])
    return dict(zip(names, node["widgets_values"]))


@pytest.mark.unit
def test_widget_values_follow_that_packs_meaning():
    migrated, _ = migrate(graph_simple())
    apply = widget_map(only_node(migrated, "ImagePromptApply"))
    assert apply == {"weight": 0.8, "weight_type": "ease out", "start_at": 0.0, "end_at": 1.0}
    assert widget_map(only_node(migrated, "ImagePromptUnifiedLoader")) == {"preset": "PLUS"}
    migrated, _ = migrate(graph_embeds())
    embeds = widget_map(only_node(migrated, "ImagePromptApplyEmbeds"))
    assert embeds["embeds_scaling"] == "V only" and embeds["unfold_batch"] is False  # padded: an older save
    migrated, _ = migrate(graph_batch_weights())
    batch = widget_map(only_node(migrated, "ImagePromptApplyAdvanced"))
    assert batch["unfold_batch"] is True and batch["combine_embeds"] == "concat"

    prompt, _ = migrate({
        "1": api_node("IPAdapterPreciseComposition", weight=0.8, composition_boost=0.35, combine_embeds="add",
                      start_at=0.1, end_at=0.9, embeds_scaling="K+V"),
        "2": api_node("IPAdapterPreciseStyleTransfer", weight=1.1, style_boost=2.5, combine_embeds="concat",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "3": api_node("IPAdapterAdvanced", weight=0.6, weight_type="style transfer precise", combine_embeds="concat",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "4": api_node("IPAdapterStyleCompositionBatch", weight_style=1.2, weight_composition=0.9, expand_style=True,
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "5": api_node("IPAdapterUnifiedLoaderFaceID", preset="FACEID PORTRAIT (style transfer)", lora_strength=0.5,
                      provider="CUDA"),
        "6": api_node("PrepImageForClipVision", interpolation="BOX", crop_position="pad", sharpening=0.2),
        "7": api_node("IPAAdapterFaceIDBatch", weight=0.9, weight_faceidv2=1.0, weight_type="linear",
                      combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "8": api_node("IPAdapterTiledBatch", weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                      sharpening=0.0, embeds_scaling="V only", encode_batch_size=0),
        "9": api_node("IPAdapterFaceID", weight=0.9, weight_faceidv2=1.0, weight_type="linear",
                      combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only"),
    })
    # the batch nodes give image i to latent i; their single twins every image to every latent
    assert [prompt[i]["inputs"]["unfold_batch"] for i in "789"] == [True, True, False]
    # that pack: composition_boost weighs the other blocks, weight the layout blocks
    assert prompt["1"]["class_type"] == "ImagePromptApplyAdvanced"
    assert {k: prompt["1"]["inputs"][k] for k in ("weight", "composition_weight", "weight_type", "combine_embeds")} \
        == {"weight": 0.35, "composition_weight": 0.8, "weight_type": "composition precise", "combine_embeds": "add"}
    # that pack: style_boost weighs the layout blocks
    assert (prompt["2"]["inputs"]["weight"], prompt["2"]["inputs"]["composition_weight"]) == (1.1, 2.5)
    # that pack's advanced node: a precise type's layout blocks get the weight itself
    assert prompt["3"]["inputs"]["composition_weight"] == 0.6
    assert prompt["4"]["inputs"]["expand_style"] is True and prompt["4"]["class_type"] == "ImagePromptStyleComposition"
    assert prompt["4"]["inputs"]["unfold_batch"] is True
    assert prompt["5"]["inputs"]["preset"] == "FACEID PORTRAIT" and prompt["5"]["inputs"]["provider"] == "CUDA"
    assert prompt["6"]["inputs"] == {"interpolation": "area", "crop_position": "pad", "sharpening": 0.2,
                                     **{k: v for k, v in prompt["6"]["inputs"].items()
                                        if k not in ("interpolation", "crop_position", "sharpening")}}


@pytest.mark.unit
def test_the_clip_vision_enhancers_keep_their_grid_and_ratio():
    g = CubiqGraph()
    loader = g.node("IPAdapterModelLoader", ADAPTER)
    single = g.node("IPAdapterClipVisionEnhancer", 0.8, "linear", "average", 0.0, 1.0, "V only", 3, 0.8)
    batch = g.node("IPAdapterClipVisionEnhancerBatch", 1.0, "linear", 0.0, 1.0, "V only", 2, 0.5, 0)
    for node in (single, batch):
        g.link(loader, 0, node, "ipadapter")
    migrated, report = migrate(g.workflow())
    enhancers = [node for node in migrated["nodes"] if node["type"] == "ImagePromptClipVisionEnhancer"]
    first, second = (widget_map(node) for node in sorted(enhancers, key=lambda node: node["id"]))
    assert (first["enhance_tiles"], first["enhance_ratio"], first["combine_embeds"]) == (3, 0.8, "average")
    assert (second["enhance_tiles"], second["enhance_ratio"], second["unfold_batch"]) == (2, 0.5, True)
    lines = [line for line in report if line.target == "ImagePromptClipVisionEnhancer"]
    assert len(lines) == 2 and all(line.status == "mapped with a difference in behaviour" for line in lines)
    assert all("the tiles' embeds are averaged" in str(line) for line in lines)


def report_of(report: list, kind: str) -> list:
    return [line for line in report if line.source == kind]


@pytest.mark.unit
def test_report_says_what_changes_in_behaviour():
    _, report = migrate({
        "1": api_node("IPAdapterAdvanced", weight=1.0, weight_type="ease in", combine_embeds="norm average",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "2": api_node("IPAdapterAdvanced", weight=1.0, weight_type="style transfer", combine_embeds="concat",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "3": api_node("IPAdapterPreciseComposition", weight=1.0, composition_boost=0.0, combine_embeds="concat",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
        "4": api_node("IPAdapterModelLoader", ipadapter_file=ADAPTER),
        "5": api_node("IPAdapterAdvanced", weight=1.0, weight_type="weak middle", combine_embeds="concat",
                      start_at=0.0, end_at=1.0, embeds_scaling="V only"),
    })
    lines = {line.where: line for line in report}
    assert len(report) == 5 and lines["node 4"].status == "mapped" and not lines["node 4"].differences
    ease_in = str(lines["node 1"])
    assert lines["node 1"].status == "mapped with a difference in behaviour"
    # ease in at attention block t of L: 0.05 + 0.95 (1 - t/L); the middle block is t = 6 of 16 (SD1.5)
    assert "middle block now receives the image" in ease_in and "SD1.5 block 6 gets 0.644" in ease_in
    assert "SDXL block 4 gets 0.655" in ease_in and "norm average" in ease_in
    # style transfer leaves the middle block out on both bases: nothing changes there
    assert "middle block" not in str(lines["node 2"])
    # composition precise with a zero boost: the middle block gets boost x 0.1 = 0
    assert "middle block" not in str(lines["node 3"])
    assert "SD1.5 block 6 gets 0.2" in str(lines["node 5"])


@pytest.mark.unit
def test_report_names_the_features_that_are_not_supported():
    g = CubiqGraph()
    loader = g.node("IPAdapterModelLoader", ADAPTER)
    image = g.node("LoadImage", "reference.png", "image")
    face = g.node("IPAdapterInsightFaceLoader", "CPU", "antelopev2")
    scientist = g.node("IPAdapterMS", 1.0, 1.0, "linear", "concat", 0.0, 1.0, "V only", "")
    kolors = g.node("IPAdapterFaceIDKolors", 1.0, 1.0, 0.5, "linear", "concat", 0.0, 1.0, "V only")
    for node in (scientist, kolors):
        g.link(loader, 0, node, "ipadapter")
        g.link(image, 0, node, "image")
    g.link(face, 0, scientist, "insightface")
    g.link(face, 0, kolors, "insightface")
    migrated, report = migrate(g.workflow())
    text = {line.source: str(line) for line in report}
    assert all(line.status == "not supported" for line in report
               if line.source in ("IPAdapterMS", "IPAdapterFaceIDKolors"))
    assert "FaceID adapters in the Mad Scientist node" in text["IPAdapterMS"]
    assert "weight_kolors" in text["IPAdapterFaceIDKolors"]
    # the link into what has no counterpart is gone, everything else is consistent
    assert_links_consistent(migrated)
    assert len(migrated["links"]) == len(g.links) - 1  # insightface -> mad scientist


@pytest.mark.unit
def test_weights_strategies_and_their_prompt_schedules_keep_their_links():
    migrated, report = migrate(graph_weights_strategy())
    assert not any(node["type"] in CUBIQ for node in migrated["nodes"])
    status = {line.source: line.status for line in report}
    assert status["IPAdapterWeights"] == status["IPAdapterWeightsFromStrategy"] == "mapped"
    assert status["IPAdapterCombineWeights"] == "mapped"
    assert status["IPAdapterPromptScheduleFromWeightsStrategy"] == "mapped with a difference in behaviour"
    strategy_links = [link for link in migrated["links"] if link[5] == "IMAGE_PROMPT_WEIGHTS_STRATEGY"]
    assert len(strategy_links) == 2
    schedule = only_node(migrated, "ImagePromptScheduleFromStrategy")
    assert widget_map(schedule) == {"prompt": "a cabin in the snow\na cabin at night"}
    assert widget_map(only_node(migrated, "ImagePromptCombineWeights")) == {"weights_1": 0.6, "weights_2": 0.9}


# --- UI round trip, idempotence, formats ---------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(UI_GRAPHS))
def test_ui_round_trip_keeps_every_link_and_the_layout(name):
    original = UI_GRAPHS[name]()
    migrated, report = migrate(original)
    assert original == UI_GRAPHS[name](), "migrate changed its input"
    assert report and all(line.target for line in report)
    assert_links_consistent(migrated)
    before, after = links_by_id(original), links_by_id(migrated)
    assert set(before) == set(after)
    types = table().types
    nodes_before = {node["id"]: node for node in original["nodes"]}
    nodes_after = {node["id"]: node for node in migrated["nodes"]}
    for link_id, (_, origin, origin_slot, target, target_slot, kind) in before.items():
        _, origin2, origin_slot2, target2, target_slot2, kind2 = after[link_id]
        assert (origin2, target2) == (origin, target) and kind2 == types.get(kind, kind)
        old_name = nodes_before[target]["inputs"][target_slot]["name"]
        new_name = nodes_after[target]["inputs"][target_slot2]["name"]
        assert new_name == {"pos_embed": "pos_embeds", "neg_embed": "neg_embeds"}.get(old_name, old_name)
    for node_id, node in nodes_before.items():
        new = nodes_after[node_id]
        for key in ("pos", "size", "title", "color", "bgcolor", "mode", "order", "flags"):
            assert new.get(key) == node.get(key), (node["type"], key)
        if node["type"] in HOST:
            assert new == {**node, "inputs": new["inputs"], "outputs": new["outputs"]}
            assert [slot["name"] for slot in new["inputs"]] == [slot["name"] for slot in node["inputs"]]
    assert migrated["groups"] == original["groups"] and migrated["extra"] == original["extra"]


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(UI_GRAPHS) + sorted(API_GRAPHS))
def test_migrating_twice_changes_nothing(name):
    once, report = migrate((UI_GRAPHS | API_GRAPHS)[name]())
    twice, second_report = migrate(once)
    assert report and twice == once and second_report == []


@pytest.mark.unit
def test_subgraphs_and_their_boundary_links_are_migrated():
    """A subgraph definition holding that pack's nodes, fed from the subgraph's input node (id -10)."""
    inner = CubiqGraph()
    apply = inner.node("IPAdapterEmbeds", 0.8, "linear", 0.0, 1.0, "V only")
    encoder = inner.node("IPAdapterEncoder", 1.0)
    inner.link(encoder, 0, apply, "pos_embed")
    links = [{"id": link_id, "origin_id": origin, "origin_slot": slot, "target_id": target, "target_slot": tslot,
              "type": kind} for link_id, origin, slot, target, tslot, kind in inner.links]
    links.append({"id": 7, "origin_id": -10, "origin_slot": 0, "target_id": apply, "target_slot": 1,
                  "type": "IPADAPTER"})
    inner.nodes[apply - 1]["inputs"][1]["link"] = 7
    subgraph = {"id": "5f0c1d3e-0000-4000-8000-000000000001", "name": "image prompt", "nodes": inner.nodes,
                "links": links, "inputs": [{"id": "a", "name": "ipadapter", "type": "IPADAPTER", "linkIds": [7]}],
                "outputs": [{"id": "b", "name": "MODEL", "type": "MODEL", "linkIds": []}]}
    workflow = {"nodes": [{"id": 1, "type": subgraph["id"], "inputs": [{"name": "ipadapter", "type": "IPADAPTER",
                                                                        "link": None}], "outputs": []}],
                "links": [], "definitions": {"subgraphs": [subgraph]}, "version": 0.4}
    migrated, report = migrate(workflow)
    assert {line.where for line in report} == {"subgraph 'image prompt' node 1", "subgraph 'image prompt' node 2"}
    sub = migrated["definitions"]["subgraphs"][0]
    apply_node = {node["id"]: node for node in sub["nodes"]}[apply]
    names = [slot["name"] for slot in apply_node["inputs"]]
    by_id = {link["id"]: link for link in sub["links"]}
    assert names[by_id[7]["target_slot"]] == "ipadapter" and by_id[7]["type"] == "IMAGE_PROMPT_ADAPTER"
    assert names[by_id[1]["target_slot"]] == "pos_embeds"
    assert sub["inputs"][0]["type"] == migrated["nodes"][0]["inputs"][0]["type"] == "IMAGE_PROMPT_ADAPTER"
    assert migrate(migrated)[0] == migrated


@pytest.mark.unit
def test_legacy_group_node_definitions_are_migrated():
    """A group node (the editor's older way to nest nodes) stores its inner nodes by position and its links
    as [origin index, origin slot, target index, target slot, origin id, type]."""
    inner = CubiqGraph()
    encoder = inner.node("IPAdapterEncoder", 0.7)
    apply = inner.node("IPAdapterEmbeds", 0.8, "ease out", 0.0, 1.0, "V only")
    nodes = [{key: value for key, value in node.items() if key not in ("id", "pos", "size", "order")}
             for node in inner.nodes]
    definition = {"nodes": nodes, "links": [[0, 1, 1, 3, 11, "EMBEDS"], [None, 0, 1, 1, 5, "IPADAPTER"]],
                  "external": [[1, 0, "MODEL"]]}
    workflow = {"nodes": [], "links": [], "extra": {"groupNodes": {"embeds": definition}}, "version": 0.4}
    migrated, report = migrate(workflow)
    assert [(line.where, line.target) for line in report] == [("group node 'embeds' node 0", "ImagePromptEncode"),
                                                              ("group node 'embeds' node 1", "ImagePromptApplyEmbeds")]
    assert all("check the widget values on its instances" in line.differences[-1] for line in report)
    new = migrated["extra"]["groupNodes"]["embeds"]
    names = [slot["name"] for slot in new["nodes"][apply - 1]["inputs"]]
    (neg_link, ipadapter_link) = new["links"]
    assert names[neg_link[3]] == "neg_embeds" and neg_link[1] == 1 and neg_link[4:] == [11, "EMBEDS"]
    assert names[ipadapter_link[3]] == "ipadapter" and ipadapter_link[5] == "IMAGE_PROMPT_ADAPTER"
    assert new["external"] == [[1, 0, "MODEL"]] and "id" not in new["nodes"][0]
    assert migrate(migrated)[0] == migrated


@pytest.mark.unit
def test_command_writes_the_workflow_and_prints_the_report(tmp_path):
    source = tmp_path / "cubiq.json"
    source.write_text(json.dumps(graph_advanced()))
    out = tmp_path / "ours.json"
    done = subprocess.run([sys.executable, "-m", "ipadapter_core.migrate", str(source), "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert json.loads(out.read_text()) == migrate(graph_advanced())[0]
    assert "IPAdapterAdvanced -> ImagePromptApplyAdvanced: mapped with a difference in behaviour" in done.stdout
    assert "4 node(s) of ComfyUI_IPAdapter_plus" in done.stdout
    to_stdout = subprocess.run([sys.executable, "-m", "ipadapter_core.migrate", str(out)], cwd=REPO,
                               capture_output=True, text=True, check=True)
    assert json.loads(to_stdout.stdout) == json.loads(out.read_text())
    assert "0 node(s) of ComfyUI_IPAdapter_plus" in to_stdout.stderr
    refused = subprocess.run([sys.executable, "-m", "ipadapter_core.migrate", str(tmp_path / "none.json")], cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "none.json" in refused.stderr
    pure = subprocess.run([sys.executable, "-c", "import sys, ipadapter_core.migrate; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy', 'nodes')))"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert pure.stdout.strip() == "[]"


# --- migrated graphs on the real host ---------------------------------------------------------------------------

@pytest.mark.server
@pytest.mark.parametrize("name", sorted(UI_GRAPHS))
def test_migrated_ui_graph_runs_on_the_host(server, object_info, name):
    migrated, _ = migrate(UI_GRAPHS[name]())
    prompt = ui_to_api(migrated, object_info)
    files = run_images(server, prompt, count=UI_GRAPH_IMAGES.get(name, 1))
    assert_adapter_acted(server, prompt, files, compare_ours=False)  # already ours: test_compat_ids compares


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(API_GRAPHS))
def test_migrated_api_graph_runs_on_the_host(saved_by_that_pack, name):
    server = saved_by_that_pack
    migrated, report = migrate(API_GRAPHS[name]())
    assert is_api_workflow(migrated) and report
    assert not any(node["class_type"] in table().nodes for node in migrated.values())
    files = run_images(server, migrated)
    assert_adapter_acted(server, migrated, files, compare_ours=False)
    if name == "embeds_files":
        assert list((server.base_dir / "output").glob("migrated_embeds*.safetensors"))


@pytest.mark.server
def test_migrated_faceid_graph_runs_with_a_face_embedding(saved_by_that_pack, need_models):
    server = saved_by_that_pack
    need_models("ipadapter/tiny_ip-adapter-faceid-plusv2_sd15.bin")
    migrated, report = migrate(api_faceid())
    assert [line.target for line in report] == ["ImagePromptUnifiedLoaderFaceID", "ImagePromptFaceID"]
    assert migrated["fid"]["inputs"]["weight_faceidv2"] == 1.5 and migrated["fid"]["inputs"]["on_no_face"] == "error"
    # that pack found the face with InsightFace, which is not installed here: the host says what to do
    with pytest.raises(comfy_host.PromptFailed) as failed:
        server.run_prompt(map_to_stand_ins(migrated)[0])
    assert failed.value.node_type == "ImagePromptFaceID" and "face_embeds" in failed.value.message
    migrated["face"] = api_node("ImagePromptLoadEmbeds", embeds="face.ipadpt")
    migrated["fid"]["inputs"]["face_embeds"] = ["face", 0]
    files = run_images(server, migrated)
    assert_adapter_acted(server, migrated, files, compare_ours=False)


@pytest.mark.heavy
@pytest.mark.server
@pytest.mark.models("checkpoints/sd15_layout.ckpt", "ipadapter/ip-adapter-plus_sd15.bin",
                    "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
def test_migrated_style_and_precise_nodes_run_on_the_full_sd15_layout(tmp_path, models_dir):
    migrated, report = migrate(api_style_composition())
    assert {line.target for line in report} == {"ImagePromptAdapterLoader", "ImagePromptStyleComposition",
                                                "ImagePromptApplyAdvanced"}
    run_on_the_full_sd15_layout(migrated, tmp_path / "base", models_dir)


# --- inside ComfyUI -----------------------------------------------------------------------------------------------

# A workflow file dropped on the canvas, as a user drops one.
DROP_WORKFLOW = """([text, name]) => {
    const files = new DataTransfer();
    files.items.add(new File([text], name, {type: "application/json"}));
    document.querySelector("#graph-canvas").dispatchEvent(
        new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
}"""


@pytest.mark.browser
@pytest.mark.server
def test_editor_offers_the_migration_and_queues_what_the_command_writes(server, object_info):
    """web/migrate_ipadapter_plus.js in the real frontend: dropping a graph of that pack asks, migrates
    through the pack's route, and the editor's prompt equals the command's migration; it runs."""
    from playwright.sync_api import sync_playwright
    import urllib.request
    setting = urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(setting, timeout=30).read()
    questions = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
        page.goto(server.url)
        page.wait_for_function("() => window.app?.graph && window.app.extensionManager", timeout=120_000)
        page.evaluate(DROP_WORKFLOW, [json.dumps(graph_advanced()), "cubiq_advanced.json"])
        page.wait_for_function("() => app.graph.findNodesByType('ImagePromptApplyAdvanced').length === 1",
                               timeout=60_000)
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        browser.close()
    assert len(questions) == 1 and "IPAdapterAdvanced, IPAdapterModelLoader" in questions[0]
    expected = ui_to_api(migrate(graph_advanced())[0], object_info)
    assert {key: {k: v for k, v in node.items() if k != "_meta"} for key, node in prompt.items()} == expected
    run_images(server, prompt)
