"""pyproject.toml against the Comfy Registry's specification (https://docs.comfy.org/registry/specifications):
the fields it requires, in the forms it documents, tied to the files they name (requirements.txt, the icon,
the included folders) and to the version the README states and the pack reports; and read by the host's own
reader of that file."""
from __future__ import annotations

import platform
import re
import sys
import tomllib
import xml.etree.ElementTree as ElementTree

import pytest
from packaging.specifiers import SpecifierSet

from tools import comfy_host
from tools.comfy_host import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]
REPOSITORY = PROJECT["urls"]["Repository"]

# The Registry's node id: fewer than 100 letters, digits, '-', '_' and '.', starting with a letter, and no two
# of the special characters in a row.
NODE_ID = re.compile(r"(?!.*[-_.]{2})[A-Za-z][A-Za-z0-9._-]{0,98}")
# "a three-digit version number X.Y.Z" (semver.org's core, no leading zeros)
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
# "typically matching your GitHub username": letters, digits and single inner hyphens, at most 39
GITHUB_NAME = re.compile(r"(?=.{1,39}$)[A-Za-z0-9]+(-[A-Za-z0-9]+)*")
GITHUB_REPOSITORY = re.compile(r"https://github\.com/([^/]+)/([^/]+)")
ICON_TYPES = (".svg", ".png", ".jpg", ".jpeg", ".gif")
ICON_MAX_SIDE = 400
OS_CLASSIFIER = "Operating System :: "


def requirements() -> list[str]:
    """requirements.txt's requirement lines, without comments."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.unit
def test_the_registrys_required_fields_are_there_in_their_documented_forms():
    for field in ("name", "version", "description", "requires-python"):
        assert isinstance(PROJECT.get(field), str) and PROJECT[field], f"[project] {field} must be a non-empty string"
    assert GITHUB_REPOSITORY.fullmatch(REPOSITORY), f"[project.urls] Repository is not a GitHub repository: {REPOSITORY}"
    license_forms = set(PROJECT["license"]) if isinstance(PROJECT.get("license"), dict) else set()
    assert license_forms in ({"file"}, {"text"}), "license must be { file = ... } or { text = ... }, not a bare string"
    if "file" in license_forms:
        assert (REPO_ROOT / PROJECT["license"]["file"]).is_file()
    assert isinstance(COMFY.get("PublisherId"), str) and GITHUB_NAME.fullmatch(COMFY["PublisherId"])
    assert isinstance(COMFY.get("DisplayName"), str) and COMFY["DisplayName"].strip()
    assert isinstance(COMFY.get("includes"), list) and all(isinstance(path, str) for path in COMFY["includes"])
    assert SpecifierSet(PROJECT["requires-python"]).contains(platform.python_version()), \
        "requires-python excludes the Python the tests run"
    assert isinstance(COMFY.get("requires-comfyui"), str) and SpecifierSet(COMFY["requires-comfyui"])


@pytest.mark.unit
def test_name_is_a_registry_node_id_and_the_packs_folder_name():
    assert NODE_ID.fullmatch(PROJECT["name"]), f"{PROJECT['name']!r} is not a Registry node id"
    assert PROJECT["name"] == comfy_host.PACK_DIR_NAME


@pytest.mark.unit
def test_version_is_semantic():
    assert SEMVER.fullmatch(PROJECT["version"]), f"version {PROJECT['version']!r} is not X.Y.Z"


@pytest.mark.unit
def test_dependencies_are_requirements_txts():
    assert "dependencies" not in PROJECT.get("dynamic", []), "the host's reader takes only a written list"
    assert PROJECT["dependencies"] == requirements()


@pytest.mark.unit
def test_every_url_is_the_repositorys_and_the_icon_is_a_file_in_it():
    owner, name = GITHUB_REPOSITORY.fullmatch(REPOSITORY).groups()
    for label, url in PROJECT["urls"].items():
        assert url.startswith(REPOSITORY), f"[project.urls] {label} is outside the repository: {url}"
    raw_main = f"https://raw.githubusercontent.com/{owner}/{name}/main/"
    assert COMFY["Icon"].startswith(raw_main), f"Icon is not a file of {REPOSITORY} on main: {COMFY['Icon']}"
    icon = REPO_ROOT / COMFY["Icon"].removeprefix(raw_main)
    assert icon.is_file() and icon.suffix.lower() in ICON_TYPES
    svg = ElementTree.parse(icon).getroot()  # the size check reads an SVG's width, height and viewBox
    width, height = float(svg.get("width")), float(svg.get("height"))
    assert width == height <= ICON_MAX_SIDE, f"the icon must be square, at most {ICON_MAX_SIDE} px: {width} x {height}"
    assert [float(v) for v in svg.get("viewBox").split()] == [0, 0, width, height]


@pytest.mark.unit
def test_every_included_folder_exists():
    for path in COMFY["includes"]:
        assert (REPO_ROOT / path).is_dir(), f"includes names {path}, which is not a folder of the pack"


@pytest.mark.unit
def test_readme_states_the_version_and_clones_the_repository():
    readme = (REPO_ROOT / "README.md").read_text()
    stated = re.search(r"The current version is `([^`]+)`", readme)
    assert stated and stated.group(1) == PROJECT["version"], "README.md does not state pyproject.toml's version"
    assert f"git clone {REPOSITORY}\n" in readme


@pytest.mark.host
def test_the_pack_as_the_host_loaded_it_reports_the_version(host):
    pack_package = comfy_host.pack_module("nodes").__package__.rsplit(".", 1)[0]
    assert sys.modules[pack_package].__version__ == PROJECT["version"]


@pytest.mark.host
def test_the_hosts_reader_of_pyproject_gets_the_registry_fields(host):
    """The host parses a custom node's pyproject.toml as it loads it (comfy_config, the Registry's types)."""
    import comfyui_version
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO_ROOT))
    assert (config.project.name, config.project.version) == (PROJECT["name"], PROJECT["version"])
    assert config.project.urls.repository == REPOSITORY
    assert config.project.dependencies == requirements()
    os_classifiers = [c.removeprefix(OS_CLASSIFIER) for c in PROJECT["classifiers"] if c.startswith(OS_CLASSIFIER)]
    assert os_classifiers and config.project.supported_os == os_classifiers, "an OS classifier the host does not know"
    assert (config.tool_comfy.publisher_id, config.tool_comfy.display_name, config.tool_comfy.icon) == \
        (COMFY["PublisherId"], COMFY["DisplayName"], COMFY["Icon"])
    assert config.tool_comfy.includes == COMFY["includes"]
    assert config.tool_comfy.web is None, "[tool.comfy] web would register the web folder a second time"
    assert SpecifierSet(config.project.supported_comfyui_version).contains(comfyui_version.__version__), \
        f"requires-comfyui excludes the host the tests run ({comfyui_version.__version__})"
