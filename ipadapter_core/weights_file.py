"""Reading a torch pickle (.bin, .pt, .ipadpt) weights-only, and saying plainly why a file is refused.

torch's weights-only reader rebuilds tensors and plain containers and refuses every other pickled global, so
no code in a file can run. Its own refusal advises loading the file with that protection off; ours never does:
it names the file and the globals it would have had to call (found by reading the pickle's opcodes, which runs
nothing), and says the file is refused for safety.
"""
from __future__ import annotations

import os
import pickletools
import zipfile

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be read, or that is refused; the message starts with the file's name."""


def _pickle_bytes(path: str) -> bytes:
    """The pickle of a torch file: ``data.pkl`` of a torch.save archive, or the whole file (legacy pickles)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    with open(path, "rb") as f:
        return f.read()


def _referenced_globals(data: bytes) -> list[str]:
    """``module.name`` of each GLOBAL / STACK_GLOBAL / INST in a pickle, in order, read without running it (for
    STACK_GLOBAL, the last two strings pushed before it)."""
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: what was read so far
        pass
    return list(dict.fromkeys(found))


def blocked_globals(path: str) -> list[str]:
    """The globals of a torch pickle that the weights-only reader refuses (none for a plain weights file)."""
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = set(_get_allowed_globals()) | {f"{g.__module__}.{g.__qualname__}"
                                             for g in torch.serialization.get_safe_globals() if hasattr(g, "__module__")}
    try:
        return [g for g in _referenced_globals(_pickle_bytes(path)) if g not in allowed]
    except (OSError, zipfile.BadZipFile, KeyError):
        return []


def _reason(err: Exception) -> str:
    """The part of a torch.load error that says what is wrong with the file (not torch's advice to load it with
    the protection off)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
              and "trust" not in line and not line.startswith(("Check the documentation", "Please file an issue"))]
    return f"{type(err).__name__}: {(useful or [''])[0][:200]}".rstrip(": ")


def load_weights_only(path: str, **kwargs):
    """``torch.load(path, weights_only=True)`` on the CPU (``kwargs``: e.g. mmap); WeightsFileError naming the file:
    refused for safety when it references code, unreadable otherwise."""
    name = os.path.basename(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:  # weights-only refuses code; a damaged file fails here too
        blocked = blocked_globals(path)
        if blocked:
            raise WeightsFileError(
                f"{name}: refused for safety: reading it would run {', '.join(blocked[:4])}, which a weights file "
                f"never does (the pack reads only tensors from .bin/.pt files)") from None
        raise WeightsFileError(f"{name}: not a readable weights-only torch file ({_reason(err)})") from None
