"""Where `conf/` is, the OmegaConf resolvers it uses, and the check of `group=option` overrides.

Resolvers are registered by `register_resolvers()`, which the entry scripts and the tests call before
composing a config (no registration at import time).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import OmegaConf

from latentdiff.errors import ConfigError
from latentdiff.utils import fast_precision

# the repository's conf/ (the package is installed from the repository, editable)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _with_null(num_classes: int) -> int:
    """Embedding rows for a class-conditional backbone: the classes plus one null class for CFG.

    Returns -1 (the official U-ViT value for "no class conditioning") when the data has no classes.
    """
    return int(num_classes) + 1 if int(num_classes) > 0 else -1


def _official_offset(pretrained: str | None) -> int:
    """U-ViT timestep offset for `model.pretrained`: 1 for an official release (`.pth`, trained on n = t + 1),
    0 for no weights or weights trained here (a checkpoint `.ckpt`, `.safetensors`)."""
    return 1 if pretrained is not None and str(pretrained).endswith(".pth") else 0


def register_resolvers() -> None:
    """Register the `ld.*` resolvers once (idempotent)."""
    resolvers = {
        "ld.with_null": _with_null,
        "ld.div": lambda a, b: int(a) // int(b),
        "ld.mul": lambda a, b: a * b,
        "ld.add": lambda a, b: a + b,
        "ld.if": lambda condition, a, b: a if condition else b,
        "ld.official_offset": _official_offset,
        "ld.fast_precision": fast_precision,  # bf16-mixed where bf16 is native (CPU flags, GPU), else 32-true
        "ld.cwd": os.getcwd,  # the launch directory; unlike ${hydra:runtime.cwd} it also resolves in
        # Hydra's multirun launcher, before any job (hydra.sweep.dir reads it through paths.log_dir)
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    # the run directory is decided once per process (it reads the clock and the disk)
    from latentdiff.rundir import hydra_subdir, run_dir

    for name, fn in (("ld.run_dir", run_dir), ("ld.hydra_subdir", hydra_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Reject `group=option` overrides whose option has no file, before Hydra composes anything.

    Hydra's own message spans several lines and comes with a hint about stack traces; this one names
    the group, the value and the options in one line. Sweep syntax (`a,b`, `glob(...)`, `range(...)`)
    is checked option by option where it is a plain list and left to Hydra otherwise.

    Raises:
        ConfigError: an option does not exist.
    """
    for arg in overrides:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key.replace(".", "/")
        if not group.is_dir() or "(" in value or value in ("null", "") or key.startswith("hydra/"):
            continue  # hydra/* groups also hold the options of Hydra's plugins (launchers, sweepers)
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option and option not in options:
                raise ConfigError(
                    f"{key}={option} is not a known option of '{key}'; use one of: {_some(option, options, key)}"
                )


def _some(option: str, options: list[str], key: str) -> str:
    """The options to name in an error: all of a short list, else the closest few and where the others are."""
    if len(options) <= 16:
        return ", ".join(options)
    close = difflib.get_close_matches(option, options, n=4, cutoff=0.0)
    return f"{', '.join(close)} (the closest of {len(options)}: ls conf/{key.replace('.', '/')}/)"
