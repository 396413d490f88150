"""What `train.py` checks on the composed config before Hydra starts and before torch, Lightning or diffusers load,
after every entry's rule checks (`cli.hydra_entry` runs `validation.check_early`).

A mistake in the U-ViT's shape (`model.patch_size=3` on a 32-pixel input) is found by the U-ViT's own argument
checks (`models.uvit_args`, which `UViT.__init__` runs too: one check, one place; the DiT's in
`models.dit_args`), which need no torch. Other backbones are checked by the job when it builds them. Then the
run directory is checked and claimed (`rundir.check_location`).
"""

from __future__ import annotations

from typing import Any

from latentdiff.errors import user_errors
from latentdiff.models.dit_args import check_dit_args
from latentdiff.models.uvit_args import check_uvit_args
from latentdiff.renames import canonical_target
from latentdiff.rundir import check_location

# the torch-free argument checks of a backbone, by its `_target_`
ARGUMENT_CHECKS = {"latentdiff.models.uvit.UViT": check_uvit_args, "latentdiff.models.dit.DiT": check_dit_args}


def check_model(cfg: Any) -> None:
    """Run the model's torch-free argument checks on `cfg.model`, where it has them.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    from omegaconf import OmegaConf

    target = OmegaConf.select(cfg, "model._target_", default=None)
    check = ARGUMENT_CHECKS.get(canonical_target(target)) if isinstance(target, str) else None
    if check is None:
        return
    try:
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    except Exception:  # an interpolation only the job can resolve: the job checks it
        return
    try:
        with user_errors():
            check(**{k: v for k, v in model_cfg.items() if not k.startswith("_")})
    except (TypeError, ZeroDivisionError):  # a value of a key without a rule: the job reports it in its words
        return


def check_train(cfg: Any, args: list[str]) -> None:
    """The checks of `train.py` before Hydra starts (see the module docstring).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    check_model(cfg)
    check_location(cfg, args)
