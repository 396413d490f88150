"""The smallest payloads that would run code if a loader let them: a pickle that creates a file, and the
config nodes that do the same through Hydra's `instantiate` or `torch.load(weights_only=False)`."""

from __future__ import annotations

import io
from pathlib import Path

import torch


class Touch:
    """Unpickling this opens (creates) `path`: the smallest "runs code" payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def open_node(marker: Path) -> dict:
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}


def pickle_node(marker: Path) -> dict:
    """torch.load of an in-memory pickle with weights_only=False: arbitrary code."""
    buffer = io.BytesIO()
    torch.save(Touch(marker), buffer)
    inner = {"_target_": "io.BytesIO", "initial_bytes": buffer.getvalue()}
    return {"_target_": "torch.load", "f": inner, "weights_only": False}
