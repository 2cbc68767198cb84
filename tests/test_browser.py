"""The real ComfyUI frontend (served by the headless host, in Debian's Chromium driven by Playwright) opens
every UI workflow as a user dropping the file would, finds every node and link, writes the same prompt as
the API twin, queues it from its Run button and shows the result image. Screenshots go to the test's temporary
folder, or with UPDATE_SCREENSHOTS=1 to workflows/screenshots/ for the README and docs/workflows.md (a run leaves the tree as it was)."""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from support.graphs import quick, workflow_param
from tools.run_example import USERS_MODELS_ONLY, WORKFLOWS, map_to_stand_ins
from tools.workflow_ui import with_defaults

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = WORKFLOWS / "screenshots"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
STEPS, SIDE = 1, 128
# No first-run tutorial, no minimap, and full node detail at any zoom (the screenshots fit the whole graph).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
VIEWPORT, SCREENSHOT_SIZE = {"width": 1800, "height": 1000}, (1200, 667)

# A file dropped anywhere on the page reaches the app's document-level drop handler.
DROP_FILE = """([text, name]) => {
    const data = new DataTransfer();
    data.items.add(new File([text], name, {type: "application/json"}));
    document.body.dispatchEvent(
        new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""
# QUEUE_NOTE: after a dropped file loads, frontend 1.32.9 leaves its loading spinner's BlockUI mask on the
# page in headless Chromium (the leave animation ends, the element stays), and it swallows pointer clicks;
# keys still reach the app, so the test queues with Ctrl+Enter, the Run button's own shortcut.
# Every link of the live graph: does it join two existing nodes, on slots that point back to it, with one type?
BROKEN_LINKS = """() => {
    const broken = [];
    for (const link of app.graph.links.values ? app.graph.links.values() : Object.values(app.graph.links)) {
        if (!link) continue;
        const origin = app.graph.getNodeById(link.origin_id), target = app.graph.getNodeById(link.target_id);
        const input = target?.inputs?.[link.target_slot], output = origin?.outputs?.[link.origin_slot];
        if (!input || !output || input.link !== link.id || !(output.links || []).includes(link.id)
            || output.type !== link.type || (input.type !== link.type && input.type !== "*"))
            broken.push(link.id);
    }
    return broken;
}"""
SET_WIDGETS = """(values) => {
    for (const [id, widgets] of Object.entries(values)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(widgets)) {
            const widget = node.widgets.find(w => w.name === name);
            widget.value = value;
            widget.callback?.(value);
        }
    }
    app.graph.setDirtyCanvas(true, true);
}"""
# Replace node ``id`` by a new node of ``type`` at its place, with the same id and its outputs linked to the same
# inputs (what a user does who swaps a loader for another; the new node's widgets keep their defaults).
SWAP_NODE = """([id, type]) => {
    const old = app.graph.getNodeById(id);
    const linkOf = (l) => app.graph.links.get ? app.graph.links.get(l) : app.graph.links[l];
    const targets = old.outputs.map(o => (o.links || []).map(l => [linkOf(l).target_id, linkOf(l).target_slot]));
    const node = LiteGraph.createNode(type);
    node.pos = [...old.pos];
    app.graph.remove(old);
    node.id = id;
    app.graph.add(node);
    targets.forEach((links, slot) => links.forEach(([target, targetSlot]) =>
        node.connect(slot, app.graph.getNodeById(target), targetSlot)));
    return node.id;
}"""
# The images a node shows once the run finishes (the frontend loads them from /view).
SHOWN_IMAGES = """(id) => (app.graph.getNodeById(id).imgs || []).filter(img => img.complete && img.naturalWidth > 0)
    .map(img => [img.naturalWidth, img.naturalHeight])"""


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), "Debian's chromium is missing: tools/env.sh installs it (apt-get install chromium)"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser):
    for setting, value in SETTINGS.items():
        request = urllib.request.Request(f"{server.url}/settings/{setting}", data=json.dumps(value).encode(),
                                         method="POST")
        urllib.request.urlopen(request, timeout=30).read()
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_function("window.app?.graph && window.LiteGraph && app.graph.nodes.length > 0", timeout=90_000)
    yield page
    context.close()


def drop(page, path: Path, text: str | None = None) -> None:
    page.evaluate(DROP_FILE, [path.read_text() if text is None else text, path.name])


# The frontend's word that a graph has nodes no pack provides: a dialog listing them (1.32), or an error whose
# text says so, with a button that opens the list (1.45).
MISSING_NODES = """() => document.querySelectorAll(".comfy-missing-nodes").length
    + (/nodes are missing/i.test(document.body.innerText) ? 1 : 0)"""


def missing_node_dialogs(page) -> int:
    return page.evaluate(MISSING_NODES)


def test_the_missing_node_check_sees_an_unknown_node(page, tmp_path):
    graph = json.loads((WORKFLOWS / "sd15_text_to_image.json").read_text())
    graph["nodes"][0]["type"] = "NoSuchNodeAnywhere"
    drop(page, tmp_path / "broken.json", json.dumps(graph))
    page.wait_for_function(MISSING_NODES, timeout=30_000)
    if page.locator(".comfy-missing-nodes").count():
        assert "NoSuchNodeAnywhere" in page.locator(".comfy-missing-nodes").inner_text()


def quick_api(name: str) -> dict:
    """The API twin with the factory's stand-in file names, one step and a small latent: what the test
    sets in the UI before it queues."""
    prompt, _ = map_to_stand_ins(json.loads((WORKFLOWS / "api" / name).read_text()))
    return quick(prompt, STEPS, SIDE)


def without_titles(prompt: dict) -> dict:
    return {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in prompt.items()}


def changed_widgets(frontend: dict, wanted: dict) -> dict:
    return {i: {k: v for k, v in n["inputs"].items() if not isinstance(v, list) and frontend[i]["inputs"].get(k) != v}
            for i, n in wanted.items()}


# The frontend's own Fit View command (newer frontends draw, and so load the images of, only the nodes in view).
FIT_VIEW = """async () => {
    try {
        await app.extensionManager.command.execute("Comfy.Canvas.FitView");
        return true;
    } catch (error) {
        return false;
    }
}"""


def fit_view(page) -> None:
    if not page.evaluate(FIT_VIEW):
        page.keyboard.press(".")  # the "fit view" key of frontends without the command
    page.wait_for_timeout(300)


def save_screenshot(page, name: str, folder: Path) -> Path:
    """Fit the graph to the window, and keep a small PNG of it in ``folder``."""
    fit_view(page)
    folder.mkdir(exist_ok=True)
    target = folder / f"{Path(name).stem}.png"
    raw = target.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    with Image.open(raw) as image:
        small = image.convert("RGB").resize(SCREENSHOT_SIZE, Image.LANCZOS).quantize(colors=128)
        small.save(target, optimize=True)
    raw.unlink()
    return target


@pytest.mark.parametrize("name", [workflow_param(p.name) for p in UI_FILES])
def test_frontend_opens_queues_and_shows_the_workflow(server, page, need_models, name, tmp_path):
    path = WORKFLOWS / name
    graph = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / name).read_text())
    drop(page, path)
    page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(graph["nodes"]), timeout=30_000)
    page.wait_for_timeout(300)
    assert missing_node_dialogs(page) == 0
    assert page.evaluate("app.graph.links.size ?? Object.keys(app.graph.links).length") == len(graph["links"])
    assert page.evaluate(BROKEN_LINKS) == []

    frontend = page.evaluate("app.graphToPrompt().then(result => result.output)")
    object_info = server.get_json("/object_info")
    assert without_titles(frontend) == with_defaults(api, object_info)
    for node_id, node in api.items():
        if "_meta" in node:
            assert frontend[node_id]["_meta"]["title"] == node["_meta"]["title"]
    folder = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    if name in USERS_MODELS_ONLY:  # no built-in model runs it (test_workflows checks that it says so): opened only
        assert save_screenshot(page, name, folder).stat().st_size < 400_000
        return
    wanted = quick_api(name)
    _, needed = map_to_stand_ins(api)
    need_models(*needed)
    for node_id, node in wanted.items():  # loaders the built-in models replace by another node (Flux's T5)
        if node["class_type"] != api[node_id]["class_type"]:
            assert page.evaluate(SWAP_NODE, [int(node_id), node["class_type"]]) == int(node_id)
    frontend = page.evaluate("app.graphToPrompt().then(result => result.output)")
    page.evaluate(SET_WIDGETS, changed_widgets(frontend, wanted))
    assert without_titles(page.evaluate("app.graphToPrompt().then(result => result.output)")) == \
        with_defaults(wanted, object_info)

    fit_view(page)
    page.keyboard.press("Control+Enter")  # the Run button's shortcut (see QUEUE_NOTE)
    save_ids = [int(i) for i, n in api.items() if n["class_type"] == "SaveImage"]
    page.wait_for_function(f"() => {{ app.graph.setDirtyCanvas(true, true); "
                           f"return {json.dumps(save_ids)}.every(id => ({SHOWN_IMAGES})(id).length > 0); }}",
                           timeout=600_000, polling=500)
    latent = [n["inputs"] for n in wanted.values() if n["class_type"] == "EmptyLatentImage"]
    expected = [[latent[0]["width"], latent[0]["height"]]] * latent[0]["batch_size"] if latent else [[256, 256]]
    for node_id in save_ids:
        assert page.evaluate(SHOWN_IMAGES, node_id) == expected
    assert missing_node_dialogs(page) == 0
    assert save_screenshot(page, name, folder).stat().st_size < 400_000
