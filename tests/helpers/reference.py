"""Weights for comparing a backbone with its official implementation (run outside this repository)."""

from __future__ import annotations

import math

import torch


def deterministic_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weights that depend on nothing but the key names and shapes (no init code of either model)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key in sorted(shapes):
        w = torch.randn(shapes[key], generator=g, dtype=torch.float64)
        if len(shapes[key]) >= 2:
            w = w / math.prod(shapes[key][1:]) ** 0.5  # unit-variance activations: fan-in scaling
        else:
            w = 0.1 * w + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
        out[key] = w.float()
    return out
