"""Checking a composed config once, before any work (`check_config`, `validate_train_config`).

Three sources say what a value may be: the constructor of every `_target_` node (`latentdiff.signatures`:
names and type hints), `latentdiff.rules.RULES` (the ranges of the group keys) and `ENTRY_RULES` (the
top-level keys of each entry point). Every number anywhere must be finite (NaN and inf are refused, but for
the keys of `INFINITE_OK`); a mandatory value left unset (`???`) is named with the option to set. A failure is
one `ConfigError` line naming the key, the value and what is allowed. Checks that need the data or built
objects live with them (the datamodule, `run_training`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentdiff.errors import ConfigError, shorten
from latentdiff.rules import ENTRY_RULES, Rule, rule_for
from latentdiff.signatures import MISSING, check_targets, describe, fits, leaves
from latentdiff.utils import native_bf16

log = logging.getLogger(__name__)

INFINITE_OK: tuple[str, ...] = ()
# which keys must have a value (no `???`) for each entry: the groups it builds, or only its own keys
_NEEDS_GROUPS = {"train": True, "extract": True, "sample": False, "evaluate": False, "export": False}


def check_config(cfg: DictConfig, entry: str, groups: bool = True, targets: bool = True) -> None:
    """Check every key of a composed config against what it allows (see the module docstring).

    Args:
        cfg: the composed config (any entry's).
        entry: "train", "sample", "evaluate", "extract" or "export" (selects `ENTRY_RULES` and which missing
            values are mistakes).
        groups: also check the group keys (RULES, constructors); False for a config whose groups are checked
            elsewhere (sample.py checks the run config it builds from a checkpoint).
        targets: also check the `_target_` nodes (`check_targets`).

    Raises:
        ConfigError: the first key whose value is not allowed.
    """
    values = plain(cfg)
    check_missing(values, entry)
    _check_leaves(values, entry, groups)
    if groups and targets:
        check_targets(values)


def check_early(cfg: DictConfig, entry: str) -> None:
    """`check_config`'s rules, without its `_target_` checks, on the composed config before Hydra starts and
    before any heavy import: every value that resolves there, the data's keys first and then the model's, whose
    sizes interpolate the data's. A value computed by a resolver (`${hydra:...}` for `paths.output_dir`,
    `${ld.fast_precision:}` that asks torch about the machine) is left to the job.

    Raises:
        ConfigError: the first key whose value is not allowed.
    """
    values = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    values.pop("hydra", None)
    ordered = {k: values[k] for k in sorted(values, key=lambda k: {"data": 0, "model": 1}.get(k, 2))}
    for key, value in leaves(ordered):
        text = str(value) if isinstance(value, (str, list)) else ""
        if "${" in text:
            if _computed(text, values):
                continue
            try:
                node = OmegaConf.select(cfg, key, throw_on_missing=False)
                value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            except OmegaConfBaseException:
                continue
        _check_leaves({key: value}, entry, _NEEDS_GROUPS.get(entry, True))


_RESOLVER = re.compile(r"\$\{[\w.]+:")  # `${name:...}`: a resolver call, not a reference to another key
_REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # `${a.b}`: a reference to another key


def _computed(text: str, values: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether `text` calls a resolver, or refers (through any chain of references) to a value that does."""
    if _RESOLVER.search(text) or depth > 20:
        return True
    for reference in _REFERENCE.findall(text):
        node: Any = values
        for part in reference.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, (str, list)) and "${" in str(node) and _computed(str(node), values, depth + 1):
            return True
    return False


def _check_leaves(values: Mapping[str, Any], entry: str, groups: bool) -> None:
    own = ENTRY_RULES.get(entry, {})
    for key, value in leaves(values):
        if key in own:
            _check_value(key, value, own[key])
        elif groups:
            _check_value(key, value, rule_for(key))


def check_values(values: Mapping[str, Any], prefix: str = "") -> None:
    """RULES and finiteness for plain config values (e.g. the run config sample.py builds from a checkpoint)."""
    for key, value in leaves(values, prefix):
        _check_value(key, value, rule_for(key))


def plain(cfg: DictConfig | Mapping) -> dict:
    """The config as plain containers, interpolations resolved; `???` kept; one line for a broken interpolation."""
    if not OmegaConf.is_config(cfg):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "the config"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: {shorten(first, 200)}") from None


def check_missing(values: Mapping[str, Any], entry: str) -> None:
    """Refuse a mandatory value left unset (`???`)."""
    for key, value in leaves(values):
        if value == MISSING and (_NEEDS_GROUPS.get(entry, True) or "." not in key):
            group = key.split(".")[0]
            hint = f" ({group}= chosen has no default for it)" if "." in key else ""
            raise ConfigError(f"{key}=??? is missing{hint}; set {key}=<value>")


def _check_value(key: str, value: Any, rule: Rule | None) -> None:
    label = rule is not None and fits("x", rule.hint)  # a key that takes strings: `name=nan` is a name
    if (
        isinstance(value, float)
        and not math.isfinite(value)
        and not label
        and not (math.isinf(value) and key in INFINITE_OK)
    ):
        raise ConfigError(f"{key}={value} must be a finite number")
    if isinstance(value, list):
        for item in value:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}={shorten(value)} holds {item}; every number must be finite")
    if rule is None or value == MISSING:
        return
    if not fits(value, rule.hint):
        raise ConfigError(f"{key}={_show(value)} must be {describe(rule.hint)}")
    if rule.test is not None and not rule.test(value):
        raise ConfigError(f"{key}={_show(value)} {rule.allowed}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else shorten(value)


def validate_train_config(cfg: DictConfig) -> None:
    """Everything about a training config that needs no built object, run before any work.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    from latentdiff.samplers.fit import check_sampler_fits  # imports diffusers: only for a training config

    _check_training_data(cfg)  # first: an extraction source lacks the keys the rest reads
    check_config(cfg, "train", targets=False)
    check_sampler_fits(cfg)  # before the sampler's own arguments: "this sampler does not fit" says more
    check_targets(plain(cfg))
    check_machine(cfg)
    precision = OmegaConf.select(cfg, "trainer.precision", default=None)
    fused = OmegaConf.select(cfg, "optim.optimizer.fused", default=None)
    if str(precision) == "16-mixed" and fused and OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None):
        raise ConfigError(
            "trainer.precision=16-mixed with optim.optimizer.fused=true cannot clip gradients (the fused step "
            "unscales them itself); use trainer.precision=bf16-mixed, optim.optimizer.fused=false, "
            "or trainer.gradient_clip_val=null"
        )


def _check_training_data(cfg: DictConfig) -> None:
    import lightning as L
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "data._target_", default=None)
    try:
        data_class = get_class(target) if target else None
    except Exception:
        raise ConfigError(f"data._target_={target} cannot be imported; check the spelling of the class") from None
    if data_class is not None and not issubclass(data_class, L.LightningDataModule):
        raise ConfigError(
            f"data={data_class.__name__} is an extraction source, not training data; encode it with "
            "`python -m latentdiff.extract data=... out=<store>` and train with data=latents data.root=<store>"
        )


def check_machine(cfg: DictConfig) -> None:
    """Refuse an accelerator or precision this machine or this install does not have (Lightning would find it
    only when the trainer is built, after the run directory is made)."""
    import importlib.util

    import torch

    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    available = ["cpu", "auto"] + (["gpu", "cuda"] if torch.cuda.is_available() else [])
    if torch.backends.mps.is_available():
        available += ["gpu", "mps"]
    if accelerator not in ("cpu", "auto", "gpu", "cuda", "mps", "tpu"):
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} is not an accelerator; use one of auto, cpu, gpu, cuda, mps, tpu"
        )
    if accelerator not in available:
        raise ConfigError(
            f"trainer.accelerator={accelerator} is not available on this machine (no {accelerator.upper()} device is "
            f"visible to torch); use one of {', '.join(dict.fromkeys(available))}"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision.startswith("bf16") and not native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without native bfloat16 (no AVX512-BF16 or AMX): torch emulates it, "
            "about 40x slower than 32-true here; use trainer.precision=32-true",
            precision,
        )
    if precision == "transformer-engine" and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "trainer.precision=transformer-engine needs NVIDIA's transformer_engine, which is not installed; "
            "use bf16-mixed, or install transformer-engine"
        )
