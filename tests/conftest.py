"""Shared fixtures: the real ComfyUI host in process, a headless server, and factory models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
    models = need_models(*factory.LIGHT_SET)
    with comfy_host.HostServer(tmp_path_factory.mktemp("server-base"), models_dir=models) as srv:
        yield srv


@pytest.fixture(autouse=True)
def release_heavy_models(request):
    """Full-size models take gigabytes: unload them after each heavy test."""
    yield
    if request.node.get_closest_marker("heavy") and comfy_host.in_process_base() is not None:
        import gc

        import comfy.model_management
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()
