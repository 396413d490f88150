"""Backbone weights: reading a weights file or a folder, checking that it fits, and loading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.checkpoint import backbone_weights, read_weights_file

_OFFICIAL_WEIGHTS = "https://github.com/baofff/U-ViT#pretrained-models"
EXPORT_RECORD = "latentdiff.json"  # the run an export folder of `latentdiff.export` holds


def read_state_dict(path: str | Path, key: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """The backbone weights in a file: a plain state dict (.pth/.pt/.bin/.safetensors) or a Lightning checkpoint.

    From a checkpoint of this project the EMA weights are returned (the raw ones when it has no EMA).

    Raises:
        FileNotFoundError: no such file (the message says where official weights are downloaded).
        ValueError: the file holds no state dict (`ConfigError`: unreadable, refused or corrupt).
    """
    official = f"official U-ViT: {_OFFICIAL_WEIGHTS}; DiT, SiT, LightningDiT: the links in their READMEs"
    state = read_weights_file(path, key, f"the weights ({official})")  # weights_only=True
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state, _ = backbone_weights(state["state_dict"])
    elif isinstance(state, dict) and isinstance(state.get("ema"), dict):  # a training checkpoint of LightningDiT
        state = state["ema"]  # ({"model", "ema", "opt", "config"}): its EMA, as it samples. (DiT's and SiT's also
        # store argparse's Namespace, which weights_only=True refuses: their released .pt files are state dicts)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{key}={path} holds no state dict of tensors")
    return state


def check_fits(backbone: nn.Module, state: dict[str, torch.Tensor], key: str, value: Any, model_name: str) -> None:
    """Raise one line naming what differs when `state` cannot be loaded into `backbone` strictly."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shapes differ (e.g. {shapes[0]})")
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{key}={value} does not fit {model_name}: {'; '.join(parts)}")


def load_pretrained(backbone: nn.Module, pretrained: str | Path, key: str = "model.pretrained") -> None:
    """Load weights into `backbone` (a `contract.Backbone`) in place (strict).

    `pretrained` is a weights file (see `read_state_dict`), an export folder of `latentdiff.export` (its
    `backbone.safetensors`), a diffusers pipeline folder (its `unet/` or `transformer/`, the backbone's
    `export_folder`), or a diffusers model folder of the backbone (`Backbone.load_diffusers`).
    """
    path = Path(pretrained)
    name = type(backbone).__name__
    index = path / "model_index.json"
    if path.is_dir() and ((path / EXPORT_RECORD).is_file() or index.is_file()):
        if (path / EXPORT_RECORD).is_file() or "_latentdiff" in json.loads(index.read_text()):  # an export folder
            path = path / "backbone.safetensors"  # (latentdiff.export; older ones: model_index.json): the whole
            # backbone (UVit2D's class tables too)
        else:  # a diffusers pipeline folder (e.g. amused/amused-256): its denoiser
            path = path / backbone.export_folder
        if not path.exists():
            raise ValueError(f"{key}={pretrained} holds no {path.name} for the configured {name}")
    state = backbone.load_diffusers(path, key, str(pretrained)) if path.is_dir() else read_state_dict(path, key)
    state = backbone.from_official(state, key, str(pretrained))
    check_fits(backbone, state, key, pretrained, f"the configured {name}")
    backbone.load_state_dict(state)
