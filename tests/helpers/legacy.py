"""The legacy files (`tests/data/legacy/`), what the code before the change computed from them, and how the
tests read them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

LEGACY = next(p for p in Path(__file__).resolve().parents if p.name == "tests") / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected" / "expected.json").read_text())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


IO = read_npz(LEGACY / "expected" / "backbone_io.npz")


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def uvit_out(backbone: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        x, t, cond = (torch.from_numpy(IO[k]) for k in ("uvit_x", "uvit_t", "uvit_cond"))
        return backbone.eval()(x, t, cond)


def tokens_out(backbone: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(torch.from_numpy(IO["tokens_x"]), None, torch.from_numpy(IO["tokens_cond"]))
