"""Crafted pickles: files whose unpickling (without weights-only) would run code, and a canary that shows it ran."""
from __future__ import annotations

import pickle
from pathlib import Path


class Canary:
    """Unpickling this (without weights-only) would create the file at ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle(path: Path, payload) -> None:
    """``payload`` (holding a Canary somewhere) pickled to ``path``, as a crafted model or embeds file."""
    with open(path, "wb") as f:
        pickle.dump(payload, f)
