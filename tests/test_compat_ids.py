"""ComfyUI_IPAdapter_plus's node ids on a server with only this pack: /object_info serves them with that pack's
inputs, option lists, defaults and outputs, and API prompts in that pack's format run unchanged (no migration
step) and save the images of the same graph migrated to our nodes, not those of the bare model: that pack's graphs
(tests/support/cubiq*.py, modelled on its example graphs), and prompts built the way Krita AI Diffusion
(IPAdapterModelLoader, CLIPVisionLoader, IPAdapterEncoder, IPAdapterCombineEmbeds, IPAdapterEmbeds,
IPAdapterInsightFaceLoader, IPAdapterFaceID) and SwarmUI (IPAdapterUnifiedLoader or its FaceID twin, then
IPAdapterAdvanced or IPAdapterFaceID) build theirs. With a copy of that pack under custom_nodes, none is ours."""
from __future__ import annotations

import pytest

from ipadapter_core.migrate import MigrationTable, migrate, node_schema
from support.cubiq import CLIP_H, CUBIQ, UI_GRAPHS, sockets
from support.cubiq_prompts import (API_GRAPHS, api_base, api_faceid, api_node, api_style_composition, api_tail,
                                   krita_embeds, write_saved_embeds)
from support.graphs import assert_adapter_acted, run_images, run_on_the_full_sd15_layout, ui_to_api
from tools import comfy_host
from tools.run_example import map_to_stand_ins

TABLE = MigrationTable.load()
MAPPED = sorted(source for source, rule in TABLE.nodes.items() if rule["to"] is not None)
# that pack's FaceID nodes find the face with InsightFace (not installed here): they fail with what to install
NEED_INSIGHTFACE = {"IPAdapterFaceID", "IPAAdapterFaceIDBatch", "IPAdapterFaceIDKolors", "IPAdapterInsightFaceLoader"}
COMPAT_CATEGORY = "image_prompt/ComfyUI_IPAdapter_plus ids"


def schema_sockets(schema: dict) -> tuple[list, list, list]:
    """(link inputs as (name, type), widget names, outputs as (name, type)) of a schema as node_schema writes it."""
    links = [(spec["name"], spec["type"]) for spec in schema["inputs"] if not spec["widget"]]
    widgets = [spec["name"] for spec in schema["inputs"] if spec["widget"]]
    return links, widgets, [(out["name"], out["type"]) for out in schema["outputs"]]


@pytest.fixture(scope="module")
def compat_server(server):
    """The session's server, with embeds files as that pack's Save Embeds wrote them in its input folder."""
    write_saved_embeds(server.base_dir / "input")
    return server


@pytest.fixture(scope="module")
def object_info(compat_server):
    return compat_server.get_json("/object_info")


# --- the schemas -------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_table_holds_that_packs_schema_for_every_mapped_id():
    """The schemas the tool read from that pack agree with the hand transcription of its INPUT_TYPES and with
    the widget order and defaults the migration reads."""
    for source in MAPPED:
        schema = TABLE.nodes[source]["schema"]
        links, widgets, outputs = schema_sockets(schema)
        want_links, want_widgets, want_outputs = CUBIQ[source]
        assert links == sockets(want_links), source
        assert widgets == want_widgets.split(), source
        assert outputs == sockets(want_outputs), source
        # a combo without a default starts at its first option
        defaults = {spec["name"]: spec.get("default", spec.get("options", [None])[0])
                    for spec in schema["inputs"] if spec["widget"]}
        for name, default in TABLE.nodes[source]["widgets"]:
            if default is not None:
                assert defaults[name] == default, (source, name)


@pytest.mark.server
def test_server_serves_every_mapped_id_with_that_packs_inputs_and_outputs(object_info):
    for source in MAPPED:
        info = object_info[source]
        schema = TABLE.nodes[source]["schema"]
        assert node_schema(info) == {"inputs": schema["inputs"], "outputs": schema["outputs"]}, source
        links, widgets, outputs = schema_sockets(node_schema(info))
        assert (links, widgets, outputs) == (sockets(CUBIQ[source][0]), CUBIQ[source][1].split(),
                                             sockets(CUBIQ[source][2])), source
        assert info["display_name"] == f"{schema['display_name']} (IPAdapter Edit)"
        assert info["category"] == COMPAT_CATEGORY and info["output_node"] == schema["output_node"]
    # the combos that list the user's files list what our loaders list
    ours = object_info["ImagePromptAdapterLoader"]["input"]["required"]["ipadapter_file"]
    assert object_info["IPAdapterModelLoader"]["input"]["required"]["ipadapter_file"][1]["options"] == \
        ours[1]["options"] and "tiny_ip-adapter-plus_sd15.bin" in ours[1]["options"]
    embeds = object_info["IPAdapterLoadEmbeds"]["input"]["required"]["embeds"][1]["options"]
    assert embeds == object_info["ImagePromptLoadEmbeds"]["input"]["required"]["embeds"][1]["options"]
    assert "reference.ipadpt" in embeds


# --- prompts in that pack's format --------------------------------------------------------------------------------

def swarm_advanced() -> dict:
    """SwarmUI's way: the unified loader from a preset, then the advanced apply."""
    prompt = api_base()
    prompt["apply"] = api_node("IPAdapterAdvanced", model=["ipa", 0], ipadapter=["ipa", 1], image=["img", 0],
                               weight=1.0, start_at=0.0, end_at=1.0, weight_type="linear", combine_embeds="concat",
                               embeds_scaling="V only")
    return api_tail(prompt, ["apply", 0])


def batch_variants() -> dict:
    """The batch twins of the tiled and enhancer nodes (image i to latent i)."""
    prompt = api_base()
    prompt.update({
        "two": api_node("ImageBatch", image1=["img", 0], image2=["img", 0]),
        "tb": api_node("IPAdapterTiledBatch", weight=0.7, weight_type="linear", start_at=0.0, end_at=1.0,
                       sharpening=0.0, embeds_scaling="V only", encode_batch_size=0, model=["ipa", 0],
                       ipadapter=["ipa", 1], image=["two", 0]),
        "eb": api_node("IPAdapterClipVisionEnhancerBatch", weight=0.5, weight_type="ease in", start_at=0.0,
                       end_at=1.0, embeds_scaling="V only", enhance_tiles=2, enhance_ratio=0.5, encode_batch_size=0,
                       model=["tb", 0], ipadapter=["ipa", 1], image=["two", 0]),
    })
    prompt = api_tail(prompt, ["eb", 0])
    prompt["lat"]["inputs"]["batch_size"] = 2
    return prompt


CLIENT_PROMPTS = {"krita_embeds": krita_embeds, "swarm_advanced": swarm_advanced, "batch_variants": batch_variants}


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(API_GRAPHS) + sorted(CLIENT_PROMPTS))
def test_api_prompt_in_that_packs_format_runs_unchanged(compat_server, need_models, name):
    prompt = {**API_GRAPHS, **CLIENT_PROMPTS}[name]()
    need_models(*map_to_stand_ins(prompt)[1])
    files = run_images(compat_server, prompt, count=2 if name == "batch_variants" else 1)
    assert_adapter_acted(compat_server, prompt, files)
    if name == "embeds_files":
        assert list((compat_server.base_dir / "output").glob("migrated_embeds*.safetensors"))


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(UI_GRAPHS))
def test_prompt_the_editor_queues_for_that_packs_graph_runs_unchanged(compat_server, object_info, name):
    """A graph saved with that pack, queued by the editor from this server's /object_info (the compatible ids)."""
    prompt = ui_to_api(UI_GRAPHS[name](), object_info)
    files = run_images(compat_server, prompt, count=4 if "weights" in name else 1)
    assert_adapter_acted(compat_server, prompt, files)


def krita_faceid() -> dict:
    prompt = api_base()
    del prompt["ipa"]
    prompt.update({
        "adp": api_node("IPAdapterModelLoader", ipadapter_file="ip-adapter-faceid-plusv2_sd15.bin"),
        "cv": api_node("CLIPVisionLoader", clip_name=CLIP_H),
        "face": api_node("IPAdapterInsightFaceLoader", provider="CPU", model_name="buffalo_l"),
        "fid": api_node("IPAdapterFaceID", model=["ckpt", 0], ipadapter=["adp", 0], clip_vision=["cv", 0],
                        insightface=["face", 0], image=["img", 0], weight=1.0, weight_faceidv2=1.0,
                        weight_type="linear", combine_embeds="average", start_at=0.0, end_at=1.0,
                        embeds_scaling="V only"),
    })
    return api_tail(prompt, ["fid", 0])


def faceid_node(kind: str, **extra) -> dict:
    prompt = api_faceid()
    prompt["fid"]["class_type"] = kind
    prompt["fid"]["inputs"].update(extra)
    return prompt


FACEID_PROMPTS = {"krita_faceid": (krita_faceid, "IPAdapterInsightFaceLoader"),
                  "swarm_faceid": (api_faceid, "IPAdapterFaceID"),
                  "faceid_batch": (lambda: faceid_node("IPAAdapterFaceIDBatch"), "IPAAdapterFaceIDBatch"),
                  "faceid_kolors": (lambda: faceid_node("IPAdapterFaceIDKolors", weight_kolors=1.0),
                                    "IPAdapterFaceIDKolors")}


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(FACEID_PROMPTS))
def test_faceid_prompt_without_insightface_says_what_to_install(compat_server, need_models, name):
    need_models("ipadapter/tiny_ip-adapter-faceid-plusv2_sd15.bin")
    build, failing = FACEID_PROMPTS[name]
    prompt, _ = map_to_stand_ins(build())
    with pytest.raises(comfy_host.PromptFailed) as failed:
        compat_server.run_prompt(prompt)
    assert "insightface" in failed.value.message, failed.value.message
    assert failed.value.node_type in (failing, TABLE.nodes[failing]["to"])
    compat_server.run_prompt(map_to_stand_ins(swarm_advanced())[0])  # the server goes on


@pytest.mark.heavy
@pytest.mark.server
@pytest.mark.models("checkpoints/sd15_layout.ckpt", "ipadapter/ip-adapter-plus_sd15.bin",
                    "ipadapter/ip_plus_composition_sd15.bin", "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
def test_style_composition_and_precise_ids_run_on_the_full_sd15_layout(tmp_path, models_dir):
    """With the batch twins of the precise nodes, the last one on the composition adapter of the community
    loader (its file is made for the full SD1.5 UNet only)."""
    prompt = api_style_composition()
    common = {key: prompt["ps"]["inputs"][key] for key in ("ipadapter", "clip_vision", "start_at", "end_at",
                                                            "embeds_scaling", "combine_embeds")}
    prompt["psb"] = api_node("IPAdapterPreciseStyleTransferBatch", weight=0.7, style_boost=1.0, model=["scb", 0],
                             image=["two", 0], **common)
    prompt["com"] = api_node("IPAdapterUnifiedLoaderCommunity", preset="Composition", model=["psb", 0])
    prompt["pcb"] = api_node("IPAdapterPreciseCompositionBatch", weight=0.5, composition_boost=0.2,
                             model=["com", 0], image=["two", 0], **{**common, "ipadapter": ["com", 1]})
    prompt["ks"]["inputs"]["model"] = ["pcb", 0]
    run_on_the_full_sd15_layout(prompt, tmp_path / "base", models_dir)


@pytest.mark.unit
def test_every_mapped_id_is_posted_by_a_test_here():
    posted = set()
    builds = [*API_GRAPHS.values(), *CLIENT_PROMPTS.values(), *(build for build, _ in FACEID_PROMPTS.values()),
              api_style_composition]
    for build in builds:
        posted |= {node["class_type"] for node in build().values()}
    for build in UI_GRAPHS.values():
        posted |= {node["type"] for node in build()["nodes"]}
    posted |= {"IPAdapterPreciseStyleTransferBatch", "IPAdapterPreciseCompositionBatch",  # added in the heavy test
               "IPAdapterUnifiedLoaderCommunity"}
    assert set(MAPPED) - posted == set()


# --- bad values ---------------------------------------------------------------------------------------------------

@pytest.mark.server
def test_bad_values_get_the_same_named_errors_as_our_nodes(compat_server, need_models):
    need_models("ipadapter/ip-adapter_sdxl.bin")
    compat = map_to_stand_ins(swarm_advanced())[0]
    compat["apply"]["inputs"]["weight"] = 9.0
    with pytest.raises(comfy_host.PromptRejected) as rejected:
        compat_server.run_prompt(compat)
    assert "weight" in str(rejected.value) and "5" in str(rejected.value)
    # a combo value out of its list (refused when queued), and an SDXL adapter with the CLIP vision of SD1.5 (fails
    # when run): the same prompt migrated to our nodes gets the same named message
    def bad_combo(prompt):
        prompt["apply"]["inputs"]["weight_type"] = "sideways"

    def wrong_adapter(prompt):
        prompt["adp"]["inputs"]["ipadapter_file"] = "ip-adapter_sdxl.bin"

    for spoil, refusal, expected in (
            (bad_combo, comfy_host.PromptRejected, ("weight_type: 'sideways' is not one of", "ease in-out")),
            (wrong_adapter, comfy_host.PromptFailed,
             ("ip-adapter_sdxl.bin", "needs the CLIP vision ViT-bigG-14", "is ViT-H-14"))):
        compat = map_to_stand_ins(krita_embeds())[0]
        ours = migrate(compat)[0]
        messages = []
        for prompt in (compat, ours):
            spoil(prompt)
            with pytest.raises(refusal) as refused:
                compat_server.run_prompt(prompt)
            messages.append(refused.value.body if refusal is comfy_host.PromptRejected else refused.value.message)
        for message in messages:
            assert all(text in message for text in expected), message
        if spoil is wrong_adapter:
            assert messages[0] == messages[1]


# --- when that pack is installed, or the switch is off ------------------------------------------------------------

STAND_IN = '''class StandInAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "stand-in"
    def apply(self, model):
        return (model,)

NODE_CLASS_MAPPINGS = {"IPAdapterAdvanced": StandInAdvanced}
'''


@pytest.fixture()
def compat_module(host):
    return comfy_host.pack_module("nodes.compat_nodes")


@pytest.mark.unit
def test_installed_copy_is_found_by_what_its_files_register(compat_module, tmp_path):
    find = compat_module.installed_copy
    (tmp_path / "SomeOtherPack").mkdir()
    (tmp_path / "SomeOtherPack" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {'Other': object}\n")
    assert find(MAPPED, [tmp_path]) is None
    (tmp_path / "ipadapter_fork.disabled").mkdir()
    (tmp_path / "ipadapter_fork.disabled" / "__init__.py").write_text(STAND_IN)
    assert find(MAPPED, [tmp_path]) is None  # disabled in the Manager
    (tmp_path / "single_file.py").write_text(STAND_IN)
    assert find(MAPPED, [tmp_path / "missing", tmp_path]) == tmp_path / "single_file.py"
    (tmp_path / "single_file.py").unlink()
    (tmp_path / "any_name").mkdir()
    (tmp_path / "any_name" / "nodes.py").write_text(STAND_IN)
    assert find(MAPPED, [tmp_path]) == tmp_path / "any_name"
    (tmp_path / "any_name" / "nodes.py").unlink()
    (tmp_path / "this_pack").symlink_to(comfy_host.REPO_ROOT, target_is_directory=True)
    assert find(MAPPED, [tmp_path]) is None  # this pack is not a copy of that one


@pytest.mark.unit
def test_switch_turns_the_compatible_ids_off(compat_module, monkeypatch):
    ours = comfy_host.pack_module("nodes").our_nodes()
    assert {node.__name__ for node in compat_module.compatible_nodes(ours)} == set(MAPPED)
    for value in ("0", "off", "false"):
        monkeypatch.setenv(compat_module.SWITCH, value)
        assert compat_module.compatible_nodes(ours) == []


@pytest.mark.server
def test_with_that_pack_installed_none_of_its_ids_is_ours(tmp_path, models_dir):
    base = tmp_path / "base"
    (base / "custom_nodes" / "ComfyUI_IPAdapter_plus").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI_IPAdapter_plus" / "__init__.py").write_text(STAND_IN)
    with comfy_host.HostServer(base, models_dir=models_dir) as server:
        info = server.get_json("/object_info")
        log = server.log_path.read_text(errors="replace")
    assert info["IPAdapterAdvanced"]["category"] == "stand-in"  # its node, not shadowed
    assert not set(MAPPED) - {"IPAdapterAdvanced"} & set(info)
    assert "ImagePromptApplyAdvanced" in info
    assert log.count("ComfyUI_IPAdapter_plus is installed") == 1
    assert not [line for line in log.splitlines() if "custom_nodes" in line and "IMPORT FAILED" in line]
