"""What `train.py` checks on the composed config before Hydra starts and before Lightning or diffusers load.

A mistake in the model's shape (`model.patch_size=3` on a 32-pixel input) is found by building the backbone on
the meta device (no memory, no weights): its constructor holds the checks, so they exist once. Only the U-ViT
family is built here (it needs torch alone); the diffusers UNets are checked by the job as before, since
importing diffusers is what this step avoids. Then the run directory is checked and claimed
(`rundir.check_location`).
"""

from __future__ import annotations

from typing import Any

from latentdiff.errors import user_errors
from latentdiff.rundir import check_location

# backbones whose module imports nothing heavier than torch
_LIGHT_BACKBONES = ("latentdiff.models.uvit.",)


def check_model(cfg: Any) -> None:
    """Build `cfg.model` on the meta device when that is cheap; its constructor's error is one line.

    Raises:
        ConfigError: the model cannot be built from the config (naming the key, as the constructor does).
    """
    from omegaconf import OmegaConf

    target = OmegaConf.select(cfg, "model._target_", default=None)
    if not isinstance(target, str) or not target.startswith(_LIGHT_BACKBONES):
        return
    try:
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    except Exception:  # an interpolation only the job can resolve: the job checks it
        return
    model_cfg["pretrained"] = None
    import torch

    from latentdiff.models import build_backbone

    with user_errors(), torch.device("meta"):
        build_backbone(model_cfg)


def check_train(cfg: Any, args: list[str]) -> None:
    """The checks of `train.py` before Hydra starts (see the module docstring).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    check_model(cfg)
    check_location(cfg, args)
