"""Shared fixtures: the real ComfyUI host in process, a headless server, and factory models."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools import comfy_host, factory  # noqa: E402


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The factory's models folder (files are built on demand by ``need_models``)."""
    return factory.models_dir()


@pytest.fixture(scope="session")
def host(tmp_path_factory, models_dir):
    """The host's ``nodes`` module, configured like ``main.py --cpu``, with this pack loaded."""
    comfy_host.import_host(base_dir=tmp_path_factory.mktemp("host-base"), models_dir=models_dir, load_nodes=False)
    return comfy_host.import_host()


@pytest.fixture(scope="session")
def need_models(host):
    """``need_models("checkpoints/tiny_sd15.ckpt", ...)`` builds those factory files if missing."""
    def need(*names: str) -> Path:
        return factory.ensure(*names)
    return need


@pytest.fixture(scope="session")
def server(tmp_path_factory, need_models):
    """A headless ComfyUI server with this pack and the light factory models."""
    from tools.run_example import copy_example_images
    srv = comfy_host.HostServer(tmp_path_factory.mktemp("server-base"), models_dir=need_models(*factory.LIGHT_SET))
    copy_example_images(srv.base_dir / "input")
    with srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_autograd():
    """The host runs every node without autograd; so do the tests (a graph kept alive by an output
    holds every activation of the model that made it)."""
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def _build_marked_models(request):
    """``@pytest.mark.models(NAME, ...)``: build those factory files before the test (and before an
    isolated test's own process starts its host)."""
    names = [name for marker in request.node.iter_markers("models") for name in marker.args]
    if names:
        request.getfixturevalue("need_models")(*names)


ISOLATED = "IMAGE_PROMPT_TEST_ISOLATED"


def _run_isolated(item) -> None:
    """Run one test in a fresh Python process: the host keeps what it loaded for the rest of its life,
    and a full SDXL UNet alone is 10 GB in float32, of the machine's 24."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", item.nodeid]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, ISOLATED: "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"failed in its own process (exit {done.returncode}):\n{done.stdout[-6000:]}{done.stderr[-2000:]}",
                    pytrace=False)


def pytest_collection_modifyitems(items):
    """Tests in their own process run first, while this process is still small: its host keeps what
    it loaded, and the two together must fit the machine."""
    if os.environ.get(ISOLATED):
        return
    own_process = [item for item in items if item.get_closest_marker("heavy")]
    for item in own_process:
        item.runtest = functools.partial(_run_isolated, item)
    items[:] = own_process + [item for item in items if item not in own_process]
