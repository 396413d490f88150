"""Backbones (`uvit.UViT`, `unet.UNet`, `unet.UNetCond`, `uvit2d.UVit2D`) and `build_backbone`, which also
loads weights.

The backbone contract: `forward(x, timesteps, cond=None)`, and `condition` says what `cond` is: "class"
(class ids (B,), with `class_rows` rows in the table: the classes and the null class), "text" (features
(B, L, D)) or "none". `check_condition` compares it with what the data gives before training starts.

Every model config has a `pretrained` key (null by default) that is not a constructor argument: a weights
file (an official U-ViT `.pth` state dict, a `.safetensors` or `.pt` state dict of the backbone, or a
Lightning checkpoint of this project, whose EMA weights are taken), an export folder of `latentdiff.export`,
or, for the UNets and UVit2D, a diffusers folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from latentdiff import trust
from latentdiff.utils import artefact_not_loaded

_OFFICIAL_WEIGHTS = "https://github.com/baofff/U-ViT#pretrained-models"


def build_backbone(model_cfg: DictConfig | dict, where: str = "the run config") -> nn.Module:
    """Build `model_cfg` (a `conf/model/*.yaml` node) and load `model_cfg.pretrained` when it is set.

    Backbones are built only from `latentdiff.trust.ALLOWED` (also from a checkpoint's or an export's stored
    config: `where` names that file in the error).
    """
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    pretrained = cfg.pop("pretrained", None)
    backbone = trust.build(cfg, where, "model")
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def read_state_dict(path: str | Path, key: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """The backbone weights in a file: a plain state dict (.pth/.pt/.bin/.safetensors) or a Lightning checkpoint.

    From a checkpoint of this project the EMA weights are returned (the raw ones when it has no EMA).

    Raises:
        FileNotFoundError: no such file (the message says where official weights are downloaded).
        ValueError: the file holds no state dict (`ConfigError`: unreadable, refused or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={path} does not exist; download the weights (official U-ViT: {_OFFICIAL_WEIGHTS}) "
            f"and set {key}=<file>"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from latentdiff.checkpoint import read_torch_file

    state = read_torch_file(path, key, what="weights file")  # weights_only=True, CRC-32s verified
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        inner = state["state_dict"]
        prefix = "ema.model." if any(k.startswith("ema.model.") for k in inner) else "backbone."
        state = {k[len(prefix) :]: v for k, v in inner.items() if k.startswith(prefix)}
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


def _is_diffusers_model(folder: Path) -> bool:
    """Whether a folder holds a diffusers model (its config.json was written by diffusers' `save_pretrained`)."""
    config = folder / "config.json"
    return config.is_file() and "_diffusers_version" in json.loads(config.read_text())


def load_pretrained(backbone: nn.Module, pretrained: str | Path, key: str = "model.pretrained") -> None:
    """Load weights into `backbone` in place (strict): a weights file, or a diffusers folder for the UNets."""
    path = Path(pretrained)
    name = type(backbone).__name__
    index = path / "model_index.json"
    if path.is_dir() and index.is_file():
        unet = hasattr(backbone, "diffusers_cls")
        if "_latentdiff" in json.loads(index.read_text()):  # an export folder (latentdiff.export): the whole
            path = path / ("unet" if unet else "backbone.safetensors")  # backbone (UVit2D's class tables too)
        else:  # a diffusers pipeline folder (e.g. amused/amused-256): its denoiser
            path = path / ("unet" if unet else "transformer")
        if not path.exists():
            raise ValueError(f"{key}={pretrained} holds no {path.name} for the configured {name}")
    if path.is_dir() and hasattr(backbone, "load_diffusers") and _is_diffusers_model(path):
        try:  # a diffusers folder of the wrapped model (e.g. aMUSEd's transformer/ for UVit2D)
            state = backbone.load_diffusers(path)
        except (OSError, ValueError) as err:
            raise artefact_not_loaded(key, str(pretrained), err) from None
        check_fits(backbone, state, key, pretrained, f"the configured {name}")
        backbone.load_state_dict(state)
        return
    if path.is_dir() and not hasattr(backbone, "diffusers_cls"):
        path = path / "diffusion_pytorch_model.safetensors"  # a transformer/ folder of an export
    if path.is_dir() and hasattr(backbone, "diffusers_cls"):
        try:
            unet = backbone.diffusers_cls.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise artefact_not_loaded(key, str(pretrained), err) from None
        state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    else:
        state = read_state_dict(path, key)
    check_fits(backbone, state, key, pretrained, f"the configured {name}")
    backbone.load_state_dict(state)


def check_condition(backbone: nn.Module, text: bool, num_classes: int) -> None:
    """Refuse a backbone whose condition is not what the data gives (text features, class ids or nothing).

    Args:
        backbone: a built backbone (`condition`, `class_rows`).
        text: the data gives text features (`data.text`).
        num_classes: the classes the run conditions on (`module.num_classes`; 0: labels are ignored).

    Raises:
        ValueError: one line naming the model, what it takes and what the data gives.
    """
    name = type(backbone).__name__
    gives = "text" if text else "class" if num_classes > 0 else "none"
    takes = backbone.condition
    words = {
        "text": "text features (data.text=true)",
        "class": f"class ids (module.num_classes={num_classes})",
        "none": "no condition (module.num_classes=0, data.text=false)",
    }
    if takes != gives:
        fix = {
            "text": "a text-conditional model (e.g. model=uvit_s2_t2i, unet_cond) or another store",
            "class": "a class-conditional model with the data's classes (model.num_classes, num_class_embeds)",
            "none": "an unconditional model, or data with labels or captions",
        }[gives]
        raise ValueError(
            f"model={name} takes {words[takes].split(' (')[0]} but the data gives {words[gives]}; use {fix}"
        )
    if takes == "class" and backbone.class_rows < num_classes + 1:
        raise ValueError(
            f"model={name} has {backbone.class_rows} class rows but module.num_classes={num_classes} needs "
            f"{num_classes + 1} (the classes and the null class); set the model's classes from the data"
        )
