"""The harness itself: host location, base directories, factory weights."""
from __future__ import annotations

import math

import pytest
import torch

from tools import comfy_host, factory
from tools.factory.pool import POOL_SIZE, WeightPools

pytestmark = pytest.mark.unit


def test_comfyui_path_names_a_users_checkout(monkeypatch, tmp_path):
    pinned = comfy_host.install_pinned_host()
    monkeypatch.setenv("COMFYUI_PATH", str(pinned))
    assert comfy_host.host_root() == pinned
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="COMFYUI_PATH"):
        comfy_host.host_root()


def test_pinned_host_is_the_expected_version_without_horde_paths():
    root = comfy_host.install_pinned_host()
    assert f'"{comfy_host.HOST_VERSION}"' in (root / "comfyui_version.py").read_text()
    assert not (root / "extra_model_paths.yaml").exists()


def test_base_dir_links_the_pack_and_models(tmp_path):
    models = tmp_path / "models-a"
    models.mkdir()
    base = comfy_host.make_base_dir(tmp_path / "base", models)
    assert (base / "custom_nodes" / comfy_host.PACK_DIR_NAME / "__init__.py").is_file()
    assert (base / "models").resolve() == models.resolve()
    other = tmp_path / "models-b"
    other.mkdir()
    comfy_host.make_base_dir(base, other)
    assert (base / "models").resolve() == other.resolve()


def test_weight_pools_are_seeded_scaled_and_fit_large_shapes():
    shapes = {"layer.weight": torch.Size([320, 1280]), "layer.bias": torch.Size([320]),
              "norm.weight": torch.Size([320]), "embed.weight": torch.Size([49408, 768])}
    first, again = WeightPools(seed=3).state_dict(shapes), WeightPools(seed=3).state_dict(shapes)
    other = WeightPools(seed=4).state_dict(shapes)
    assert all(torch.equal(first[k], again[k]) for k in shapes)
    assert not torch.equal(first["layer.weight"], other["layer.weight"])
    assert first["embed.weight"].shape == (49408, 768) and first["embed.weight"].numel() > POOL_SIZE
    assert torch.equal(first["norm.weight"], torch.ones(320, dtype=first["norm.weight"].dtype))
    std = first["layer.weight"].float().std().item()
    assert abs(std - 1 / math.sqrt(1024)) < 0.2 / math.sqrt(1024)  # fan_in 1280 rounds to the 1024 pool


def test_every_real_model_name_in_the_catalogue_has_one_stand_in():
    seen = {}
    for model in factory.CATALOGUE.values():
        folder = model.name.split("/", 1)[0]
        for real in model.stands_for:
            assert (folder, real) not in seen, f"{real} stands for two factory files"
            seen[(folder, real)] = model.name
            assert factory.stand_in(folder, real) == model.name.split("/", 1)[1]
    assert factory.stand_in("checkpoints", "v1-5-pruned-emaonly.safetensors") == "tiny_sd15.ckpt"


def test_only_tracebacks_through_the_pack_are_the_packs():
    host = comfy_host.cache_root() / f"comfyui-{comfy_host.HOST_VERSION}"
    hosts_own = ("Traceback (most recent call last):\n"
                 f'  File "{host}/nodes.py", line 2146, in load_custom_node\n    module_spec.loader.exec_module(module)\n'
                 f'  File "{host}/comfy/audio_encoders/whisper.py", line 4, in <module>\n    import torchaudio\n'
                 "ModuleNotFoundError: No module named 'torchaudio'")
    through_link = ("Traceback (most recent call last):\n"
                    f'  File "/tmp/base/custom_nodes/{comfy_host.PACK_DIR_NAME}/nodes/loaders.py", line 3, in f\n'
                    "    x()\nValueError: bad")
    through_repo = ("Traceback (most recent call last):\n"
                    f'  File "{comfy_host.REPO_ROOT}/ipadapter_core/variants.py", line 9, in g\n    y()\n'
                    "KeyError: 'k'")
    log = "\n".join(["starting", hosts_own, "between", through_link, through_repo, "done"])
    assert comfy_host.pack_tracebacks(log) == [through_link, through_repo]
    assert not comfy_host.frame_is_in_pack(f"{comfy_host.REPO_ROOT}/.venv/lib/python3.11/site-packages/torch/nn.py")
