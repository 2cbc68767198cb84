"""What newer hosts offer, used where the host has it (nodes/host_features.py): search aliases (that pack's display
names and node ids find our nodes) and the node-replacement registry (with our copies of that pack's ids off, the
editor's swap and the server's replacement in API prompts). On a host without a feature the same tests check that
nothing breaks and skip only the part that needs it, naming the missing host feature.

The replacements must give what the migration gives, or be refused: the unit test replaces that pack's node with
every option and range end of each widget, linked and unlinked, and compares with the table's migration."""
from __future__ import annotations

import dataclasses
import json
import urllib.error
from pathlib import Path

import pytest

from ipadapter_core.migrate import MigrationTable, migrate
from ipadapter_core.migrate.node_replace import lacks_mapped_input, plan, replace_in_prompt, replaced_inputs
from support.cubiq_prompts import api_base, api_faceid, api_node, api_tail, krita_embeds
from support.graphs import assert_adapter_acted
from tools import comfy_host, factory
from tools.run_example import map_to_stand_ins

TABLE = MigrationTable.load()
PLAN = plan(TABLE)
MAPPED = sorted(source for source, rule in TABLE.nodes.items() if rule["to"] is not None)
SWITCH = "COMFYUI_IPADAPTER_EDIT_COMPAT_IDS"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "migration.md"


# --- the replacements, against the migration ----------------------------------------------------------------------

def widget_values(spec: dict) -> list:
    """The values worth trying for one of that pack's widgets: every option, the range ends, both booleans."""
    if "options" in spec:
        return list(spec["options"])
    if spec["type"] in ("INT", "FLOAT"):
        return [spec[key] for key in ("min", "default", "max") if key in spec]
    if spec["type"] == "BOOLEAN":
        return [False, True]
    return [spec.get("default") or "a value"]


def samples(source: str):
    """API-format inputs of that pack's node: its defaults with every link, with the required links only, one
    widget changed at a time, and one widget given by a link."""
    rule = TABLE.nodes[source]
    specs = rule["schema"]["inputs"]
    defaults = {name: "some_file.safetensors" if default is None else default for name, default in rule["widgets"]}
    links = {spec["name"]: ["up", index] for index, spec in enumerate(specs) if not spec["widget"]}
    required = {name: link for name, link in links.items()
                if not next(spec for spec in specs if spec["name"] == name).get("optional")}
    yield {**defaults, **links}
    yield {**defaults, **required}
    for spec in specs:
        if spec["widget"]:
            for value in widget_values(spec):
                yield {**defaults, **required, spec["name"]: value}
    if defaults:
        yield {**defaults, **required, next(iter(defaults)): ["widget_source", 0]}


def refused_by_ours(target: str, inputs: dict) -> list[str]:
    """The values of ``inputs`` our node refuses: a combo value not among its options, a number out of its range."""
    refused = []
    for spec in TABLE.ours[target]["inputs"]:
        value = inputs.get(spec["name"])
        if not spec["widget"] or value is None or isinstance(value, list):
            continue
        if "options" in spec and value not in spec["options"]:
            refused.append(f"{spec['name']} {value!r}")
        elif spec["type"] in ("INT", "FLOAT") and not spec.get("min", value) <= value <= spec.get("max", value):
            refused.append(f"{spec['name']} {value!r}")
    return refused


@pytest.mark.unit
def test_every_replacement_gives_what_the_migration_gives_or_is_refused():
    """For every value tried, the replaced node is the migrated node; or our node refuses a value (then never
    one of that pack's defaults)."""
    assert set(PLAN.offered) | set(PLAN.skipped) == set(MAPPED)
    assert not set(PLAN.offered) & set(PLAN.skipped)
    tried = refused = 0
    for source, replacement in PLAN.offered.items():
        target = TABLE.nodes[source]["to"]
        assert replacement["new_node_id"] == target and replacement["old_node_id"] == source
        assert replacement["old_widget_ids"] == ([name for name, _ in TABLE.nodes[source]["widgets"]] or None)
        for number, inputs in enumerate(samples(source)):
            ours = {"class_type": target, "inputs": replaced_inputs(replacement, inputs)}
            migrated = migrate({"n": {"class_type": source, "inputs": inputs}}, TABLE)[0]["n"]
            tried += 1
            if refused_by_ours(target, ours["inputs"]):
                assert number > 1, (source, "refuses that pack's defaults", refused_by_ours(target, ours["inputs"]))
                refused += 1
                continue
            assert ours == migrated, (source, inputs)
        outputs = TABLE.nodes[source]["outputs"]
        assert replacement["output_mapping"] == ([{"new_idx": slot, "old_idx": index}
                                                   for index, slot in enumerate(outputs)] or None)
    assert tried > 300 and refused < tried / 10


@pytest.mark.unit
def test_the_ids_not_offered_are_those_a_replacement_cannot_express():
    """The node ids the editor's swap leaves to the migration, each for the reason the docs give."""
    assert sorted(PLAN.skipped) == ["IPAdapter", "IPAdapterAdvanced", "IPAdapterBatch", "IPAdapterClipVisionEnhancer",
                                    "IPAdapterClipVisionEnhancerBatch", "IPAdapterFaceIDKolors", "IPAdapterMS",
                                    "IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderCommunity",
                                    "PrepImageForClipVision"]
    assert "composition_weight is computed from weight, weight_type" in PLAN.skipped["IPAdapterAdvanced"]
    assert "(that pack's default) is 'LIGHT - SD1.5 only' here" in PLAN.skipped["IPAdapterUnifiedLoader"]
    assert "weight_kolors" in PLAN.skipped["IPAdapterFaceIDKolors"]
    docs = " ".join(DOCS.read_text().split())
    assert f"({len(PLAN.offered)} of the {len(MAPPED)} the table maps" in docs
    for source in PLAN.skipped:
        assert f"`{source}`" in docs, source


@pytest.mark.unit
def test_a_node_without_an_optional_input_is_replaced_without_it():
    """The host reads every mapped input; the pack's pass before it leaves out those a node lacks."""
    prompt = map_to_stand_ins(krita_embeds())[0]
    apply = prompt["apply"]
    assert lacks_mapped_input(PLAN.offered["IPAdapterEmbeds"], apply["inputs"])  # no neg_embed
    replace_in_prompt(prompt, PLAN.offered, ["apply"])
    assert apply["class_type"] == "ImagePromptApplyEmbeds" and "neg_embeds" not in apply["inputs"]
    assert apply["inputs"]["pos_embeds"] == ["cat", 0] and apply["inputs"]["unfold_batch"] is False


# --- a server with our copies of that pack's ids off ----------------------------------------------------------------

@pytest.fixture(scope="module")
def off_server(tmp_path_factory, need_models):
    """One headless server for this module, started with COMFYUI_IPADAPTER_EDIT_COMPAT_IDS=0."""
    from tools.run_example import copy_example_images
    srv = comfy_host.HostServer(tmp_path_factory.mktemp("compat-off-base"), models_dir=need_models(*factory.LIGHT_SET))
    copy_example_images(srv.base_dir / "input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SWITCH, "0")  # read by the server process at its start
        srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(off_server):
    return off_server.get_json("/object_info")


@pytest.fixture(scope="module")
def host_io(host):
    from comfy_api.latest import io
    return io


def schema_has_search_aliases(io) -> bool:
    return "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}


@pytest.mark.server
def test_the_pack_loads_with_our_copies_of_that_packs_ids_off(off_server, object_info):
    assert "ImagePromptApplyAdvanced" in object_info and "InstructEditSampler" in object_info
    assert not set(MAPPED) & set(object_info)
    log = off_server.log_path.read_text(errors="replace")
    assert not [line for line in log.splitlines() if "custom_nodes" in line and "IMPORT FAILED" in line]
    assert not off_server.pack_tracebacks()


@pytest.mark.server
def test_our_nodes_are_found_by_that_packs_names(object_info, host_io, host):
    ours = {name: info for name, info in object_info.items() if info["python_module"].startswith("custom_nodes.")}
    expected = {}
    for source, rule in TABLE.nodes.items():  # in the table's order
        if rule["to"] is not None:
            names = expected.setdefault(rule["to"], [])
            names += [name for name in (rule["schema"]["display_name"], source) if name not in names]
    in_process = {node.define_schema().node_id: node.define_schema()
                  for node in comfy_host.pack_module("nodes").our_nodes()}
    if not schema_has_search_aliases(host_io):
        assert not [name for name, info in ours.items() if "search_aliases" in info]
        assert not [name for name, schema in in_process.items() if hasattr(schema, "search_aliases")]
        pytest.skip("the host's io.Schema has no search_aliases field: nothing is set, nothing to search by")
    for name, info in ours.items():
        assert info.get("search_aliases") == expected.get(name), name
        assert in_process[name].search_aliases == (expected.get(name) or []), name
    aliases = object_info["ImagePromptApplyAdvanced"]["search_aliases"]
    assert aliases[:4] == ["IPAdapter Advanced", "IPAdapterAdvanced", "IPAdapter Batch (Adv.)", "IPAdapterBatch"]
    assert "IPAdapter Mad Scientist" in aliases and "IPAdapterPreciseStyleTransfer" in aliases
    assert object_info["ImagePromptUnifiedLoader"]["search_aliases"] == [
        "IPAdapter Unified Loader", "IPAdapterUnifiedLoader", "IPAdapter Unified Loader Community",
        "IPAdapterUnifiedLoaderCommunity"]


def node_replacements(server) -> dict | None:
    """GET /node_replacements, or None where the host has no such route."""
    try:
        return server.get_json("/node_replacements")
    except urllib.error.HTTPError as err:
        assert err.code == 404, err
        return None


@pytest.mark.server
def test_the_editor_is_offered_the_swap_for_that_packs_ids(off_server, host_io):
    listed = node_replacements(off_server)
    log = off_server.log_path.read_text(errors="replace")
    if getattr(host_io, "NodeReplace", None) is None:
        assert listed is None and "node replacements" not in log
        pytest.skip("the host has no node-replacement registry (io.NodeReplace, GET /node_replacements)")
    ours = {old: entries for old, entries in listed.items() if old in MAPPED}
    assert ours == {old: [replacement] for old, replacement in PLAN.offered.items()}
    assert f"{len(PLAN.offered)} of ComfyUI_IPAdapter_plus's node ids are registered as node replacements" in log
    for source in PLAN.skipped:
        assert f"no node replacement for {source}: " in log


@pytest.mark.server
def test_api_prompt_with_that_packs_ids_runs_through_ours(off_server, host_io, need_models):
    """Krita AI Diffusion's prompt (adapter file, encoder, combine, embeds under a mask): the replaced prompt is the
    migrated one. The loader has an _meta and every mapped input (the host replaces it); the other nodes lack an
    optional input or an _meta (the pack replaces them before the host)."""
    prompt, files = map_to_stand_ins(krita_embeds())
    need_models(*files)
    prompt["adp"]["_meta"] = {"title": "IPAdapter Model Loader"}
    if getattr(host_io, "NodeReplace", None) is None:
        with pytest.raises(comfy_host.PromptRejected) as rejected:
            off_server.run_prompt(prompt)
        assert "IPAdapterModelLoader" in rejected.value.body
        pytest.skip("the host has no node-replacement registry (io.NodeReplace): that pack's ids are unknown to it")
    entry = off_server.run_prompt(json.loads(json.dumps(prompt)))
    assert len(off_server.output_files(entry)) == 1
    assert_adapter_acted(off_server, krita_embeds(), off_server.output_files(entry))
    ran = entry["prompt"][2]
    assert {key: node["class_type"] for key, node in ran.items() if key in ("adp", "e1", "cat", "apply")} == {
        "adp": "ImagePromptAdapterLoader", "e1": "ImagePromptEncode", "cat": "ImagePromptCombineEmbeds",
        "apply": "ImagePromptApplyEmbeds"}
    migrated = migrate(prompt, TABLE)[0]
    assert {key: (node["class_type"], node["inputs"]) for key, node in ran.items()} == \
        {key: (node["class_type"], node["inputs"]) for key, node in migrated.items()}


@pytest.mark.server
def test_ids_not_offered_are_refused_not_run(off_server, host_io, need_models):
    """IPAdapterUnifiedLoader (its presets are translated) and IPAdapterAdvanced (its composition weight depends on
    the weight type) stay unknown to the host, which refuses them; the FaceID loader and apply are replaced and run
    by ours, and a FaceID preset name the table translates is refused by our node, by name."""
    for kind, inputs in (("IPAdapterUnifiedLoader", {"preset": "PLUS (high strength)", "model": ["ckpt", 0]}),
                         ("IPAdapterAdvanced", {"model": ["ckpt", 0], "ipadapter": ["ckpt", 0], "image": ["img", 0],
                                                "weight": 0.8, "weight_type": "style transfer precise",
                                                "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
                                                "embeds_scaling": "V only"})):
        prompt = {**api_base(), "ipa": api_node(kind, **inputs)}
        prompt = map_to_stand_ins(api_tail(prompt, ["ipa", 0]))[0]
        with pytest.raises(comfy_host.PromptRejected) as rejected:
            off_server.run_prompt(prompt)
        error = json.loads(rejected.value.body)["error"]  # the host's words for an unknown node type
        assert kind in error["message"] and ("does not exist" in error["message"] or
                                            error["type"] == "missing_node_type"), error
    if getattr(host_io, "NodeReplace", None) is None:
        pytest.skip("the host has no node-replacement registry (io.NodeReplace): no id of that pack is replaced")
    faceid, files = map_to_stand_ins(api_faceid())
    need_models(*files)
    with pytest.raises(comfy_host.PromptFailed) as failed:  # both replaced: our FaceID node asks for InsightFace
        off_server.run_prompt(faceid)
    assert failed.value.node_type == "ImagePromptFaceID" and "insightface" in failed.value.message
    faceid["fl"]["inputs"]["preset"] = "FACEID PORTRAIT (style transfer)"  # that pack's name for FACEID PORTRAIT
    with pytest.raises((comfy_host.PromptRejected, comfy_host.PromptFailed)) as refused:
        off_server.run_prompt(faceid)
    message = str(refused.value)  # the host's check of the combo where it checks V3 combos, else our node's
    assert "FACEID PORTRAIT (style transfer)" in message and ("not one of" in message or "not in list" in message)
