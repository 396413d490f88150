"""What each key of a composed config allows, checked once before any work (`check_config`).

Three sources say what a value may be:

- the constructor of every `_target_` node: its parameter names (a misspelt `+model.patch_sise=3` is refused
  with "did you mean model.patch_size?") and its type hints (a string where a bool is expected, a scalar
  where a pair is, a value outside a `Literal`);
- `RULES`: the ranges of the numbers a user sets (patterns of dotted keys; `*` matches one level);
- `ENTRY_RULES`: the top-level keys of each entry point (`sample.py use_ema=yes` is refused).

Every number anywhere must be finite (NaN and inf are refused, but for the keys of `INFINITE_OK`); a missing
mandatory value (`???`) is named with the option to set. A failure is one `ConfigError` line naming the key,
the value and what is allowed. Checks that need the data or built objects live with them (the datamodule,
`run_training`).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentdiff.errors import ConfigError, shorten

MISSING = "???"


@dataclass(frozen=True)
class Rule:
    """A key's type (a typing hint) and range (`test` on a value of that type), and the words for both."""

    hint: Any
    test: Callable[[Any], bool] | None = None
    allowed: str = ""


def _int(low: int) -> Rule:
    return Rule(int, lambda v: v >= low, "must be a positive integer" if low == 1 else f"must be an integer >= {low}")


def _one_of(*names: str) -> Rule:
    return Rule(str, lambda v: v in names, f"is not supported; use one of {', '.join(names)}")


def _num(test: Callable[[float], bool], allowed: str) -> Rule:
    return Rule(float, test, allowed)


POSITIVE_INT, NONNEG_INT = _int(1), _int(0)
POSITIVE = _num(lambda v: v > 0, "must be a number > 0")
NONNEG = _num(lambda v: v >= 0, "must be a number >= 0")
UNIT = _num(lambda v: 0 <= v < 1, "must be in [0, 1)")
OPEN_UNIT = _num(lambda v: 0 < v < 1, "must be in (0, 1)")
OPTIONAL_NONNEG = Rule(float | None, lambda v: v is None or v >= 0, "must be a number >= 0 (or null)")
PAIR = Rule(tuple[float, float], lambda v: all(0 <= b < 1 for b in v), "must be a pair [beta1, beta2], each in [0, 1)")

# ranges of the group keys (the constructors' type hints give the types; these rules add the ranges)
RULES: dict[str, Rule] = {
    "seed": NONNEG_INT,
    "model.img_size": POSITIVE_INT,
    "model.patch_size": POSITIVE_INT,
    "model.in_chans": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT,
    "model.depth": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.mlp_ratio": POSITIVE,
    "model.num_clip_token": POSITIVE_INT,
    "model.clip_dim": Rule(int | None, lambda v: v is None or v >= 1, "must be an integer >= 1 (or null: no text)"),
    "model.sample_size": Rule(int, lambda v: v >= 1, "must be an integer >= 1"),
    "model.layers_per_block": POSITIVE_INT,
    "data.image_size": POSITIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.num_train": POSITIVE_INT,
    "data.num_val": POSITIVE_INT,
    "data.num_workers": NONNEG_INT,
    "data.num_classes": NONNEG_INT,
    "data.latent_size": POSITIVE_INT,
    "data.latent_channels": POSITIVE_INT,
    "data.channels": POSITIVE_INT,
    "data.text_dim": POSITIVE_INT,
    "data.text_len": POSITIVE_INT,
    "vae.scaling_factor": Rule(float | None, lambda v: v is None or v > 0, "must be a number > 0 (or null)"),
    "diffusion.scheduler.num_train_timesteps": POSITIVE_INT,
    "diffusion.scheduler.beta_start": OPEN_UNIT,
    "diffusion.scheduler.beta_end": OPEN_UNIT,
    "diffusion.scheduler.shift": POSITIVE,
    "diffusion.min_snr_gamma": POSITIVE,
    "diffusion.logit_std": POSITIVE,
    "diffusion.min_masking_rate": UNIT,
    "diffusion.label_smoothing": UNIT,
    "sampler.steps": POSITIVE_INT,
    "sampler.guidance_scale": _num(lambda v: v >= 0, "must be a number >= 0 (1 = no guidance)"),
    "sampler.guidance_interval": Rule(
        tuple[float, float] | None,
        lambda v: v is None or 0 <= v[0] <= v[1],
        "must be [low, high] with 0 <= low <= high (training timesteps), or null",
    ),
    "optim.lr": _num(lambda v: v > 0, "must be > 0 (e.g. 2e-4)"),
    "optim.weight_decay": _num(lambda v: v >= 0, "must be >= 0"),
    "optim.warmup_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0"),
    "optim.betas": PAIR,
    "module.num_classes": NONNEG_INT,
    "module.p_uncond": _num(lambda v: 0 <= v < 1, "is outside [0, 1); use e.g. 0.1 (U-ViT, DiT) or 0 for no CFG"),
    "module.ema.decay": _num(lambda v: 0 <= v < 1, "must be in [0, 1) (e.g. 0.9999)"),
    "module.ema.update_every": POSITIVE_INT,
    "module.ema.start_step": NONNEG_INT,
    "module.nonfinite.max_skips": POSITIVE_INT,
    "trainer.max_steps": Rule(int, lambda v: v == -1 or v >= 1, "must be a positive integer (or -1)"),
    "trainer.accumulate_grad_batches": Rule(int, lambda v: v >= 1, "must be a positive integer"),
    "trainer.gradient_clip_val": Rule(
        float | None, lambda v: v is None or v >= 0, "must be >= 0 (0 or null disables clipping)"
    ),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.val_check_interval": Rule(
        float | None, lambda v: v is None or v > 0, "must be > 0 (optimizer steps, or a fraction of an epoch)"
    ),
    "trainer.limit_val_batches": Rule(float, lambda v: v >= 0, "must be >= 0 (batches, or a fraction)"),
    "trainer.devices": Rule(
        int | str | list[int],
        lambda v: v == "auto" or (isinstance(v, int) and (v >= 1 or v == -1)) or isinstance(v, list),
        "must be auto, a positive integer, -1 or a list of device ids",
    ),
    "callbacks.*.every_n_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0 (0: off)"),
    "callbacks.checkpoint.every_n_train_steps": Rule(int, lambda v: v >= 0, "must be an integer >= 0 (0: off)"),
    "callbacks.checkpoint.keep_last": Rule(int, lambda v: v >= -1, "must be an integer >= -1 (-1: keep all)"),
    "callbacks.checkpoint.every_n_minutes": OPTIONAL_NONNEG,
    "callbacks.*.samples_per_class": POSITIVE_INT,
    "callbacks.*.num_samples": POSITIVE_INT,
    "callbacks.*.max_classes": POSITIVE_INT,
    "callbacks.*.batch_size": POSITIVE_INT,
    "callbacks.*.steps": POSITIVE_INT,
    "callbacks.loss_curve.smoothing": UNIT,
}

# the top-level keys of each entry point
ENTRY_RULES: dict[str, dict[str, Rule]] = {
    "train": {
        "name": Rule(str, lambda v: bool(v) and "/" not in v and v not in (".", ".."), "must be a folder name"),
        "seed": NONNEG_INT,
        "resume": Rule(str | bool | None, None, "must be auto, a run directory, or null"),
        "ckpt_path": Rule(str | None, None, "must be a checkpoint file or null"),
        "objective": Rule(str | None, None, "must be a logged metric name (e.g. val/loss_ema) or null"),
        "matmul_precision": Rule(
            str | None, lambda v: v in (None, "highest", "high", "medium"), "must be highest, high, medium or null"
        ),
    },
    "sample": {
        "ckpt": Rule(str | None, None, "must be a checkpoint file or null"),
        "use_ema": Rule(bool, None, "must be true or false"),
        "num_samples": Rule(int, lambda v: v >= 1, "must be a positive integer"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be a positive integer"),
        "seed": Rule(int, lambda v: v >= 0, "must be an integer >= 0"),
        "guidance_scale": Rule(
            float | None, lambda v: v is None or v >= 0, "must be a number >= 0 (CFG w; 1 = no guidance) or null"
        ),
        "labels": Rule(str | int | list[int], None, "must be uniform, balanced, a class id or a list of ids"),
        "prompts": Rule(str, None, "must be val, train or a latent store folder"),
        "out": Rule(str | None, None, "must be a folder or null"),
        "save_png": Rule(bool, None, "must be true or false"),
        "devices": Rule(int | str, lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "must be auto or N >= 1"),
        "precision": _one_of("fp32", "bf16", "fp16"),
    },
    "evaluate": {
        "samples": Rule(str, None, "must be an .npz or an image folder"),
        "reference": Rule(str | None, None, "must be an .npz (statistics or images), an image folder or null"),
        "metrics": Rule(list[str], None, "must be a list, e.g. [fid,isc]"),
        "num_samples": Rule(int | None, lambda v: v is None or v >= 2, "must be an integer >= 2 (or null: all)"),
        "inception_weights": Rule(str | None, None, "must be a weights file or null"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "device": Rule(str, None, "must be auto, cpu or cuda[:N]"),
        "cache_dir": Rule(str | None, None, "must be a folder or null"),
        "write_stats": Rule(str | None, None, "must be an .npz path or null"),
        "out": Rule(str | None, None, "must be a .json path or null"),
        "fidelity.isc_splits": POSITIVE_INT,
        "fidelity.kid_subsets": POSITIVE_INT,
        "fidelity.kid_subset_size": POSITIVE_INT,
        "fidelity.kid_kernel": _one_of("poly", "rbf"),
        "fidelity.kid_kernel_poly_degree": POSITIVE_INT,
        "fidelity.prc_neighborhood": POSITIVE_INT,
        "fidelity.prc_batch_size": POSITIVE_INT,
        "fidelity.samples_shuffle": Rule(bool, None, "must be true or false"),
        "fidelity.rng_seed": NONNEG_INT,
    },
    "extract": {
        "out": Rule(str, None, "must be the folder of the new latent store"),
        "resolution": POSITIVE_INT,
        "shard_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "flip": Rule(bool, None, "must be true or false"),
        "batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "text_batch_size": Rule(int, lambda v: v >= 1, "must be >= 1"),
        "num_workers": Rule(int, lambda v: v >= 0, "must be >= 0"),
        "device": Rule(str, None, "must be auto, cpu or cuda[:N]"),
    },
    "export": {
        "ckpt": Rule(str, None, "must be a checkpoint file"),
        "out": Rule(str, None, "must be a new folder"),
        "use_ema": Rule(bool, None, "must be true or false"),
    },
}

# keys whose value may be infinite (none of the shipped configs; a hook for trainer.max_time-like options)
INFINITE_OK: tuple[str, ...] = ()
# keys that a `_target_` node holds but the project takes off before calling the constructor
NOT_ARGUMENTS = {"model": ("pretrained",)}
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
    own = ENTRY_RULES.get(entry, {})
    for key, value in _leaves(values):
        if key in own:
            _check_value(key, value, own[key])
        elif groups:
            _check_value(key, value, rule_for(key))
    if groups and targets:
        check_targets(values)


def check_values(values: Mapping[str, Any], prefix: str = "") -> None:
    """RULES and finiteness for plain config values (e.g. the run config sample.py builds from a checkpoint)."""
    for key, value in _leaves(values, prefix):
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
    for key, value in _leaves(values):
        if value == MISSING and (_NEEDS_GROUPS.get(entry, True) or "." not in key):
            group = key.split(".")[0]
            hint = f" ({group}= chosen has no default for it)" if "." in key else ""
            raise ConfigError(f"{key}=??? is missing{hint}; set {key}=<value>")


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key: its own entry of RULES, else the first pattern that matches it."""
    if key in RULES:
        return RULES[key]
    parts = key.split(".")
    for pattern, rule in RULES.items():
        if "*" in pattern and len(pattern.split(".")) == len(parts) and fnmatch.fnmatchcase(key, pattern):
            return rule
    return None


def _check_value(key: str, value: Any, rule: Rule | None) -> None:
    if isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and key in INFINITE_OK):
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


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every leaf; a list of plain values is one leaf (a list of dicts is walked)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and any(isinstance(v, (Mapping, list)) for v in node):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


# ------------------------------------------------------------------------------------------- types
def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (plain YAML: None, bool, int, float, str, list, dict) can be `hint`.

    Unknown hints (classes, callables, tensors) accept anything: only what a config can hold is checked.
    """
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if isinstance(value, Mapping) and "_target_" in value:
        return True  # an object built from the config: its own node is checked
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path) or hint is __import__("os").PathLike:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence, typing.Sequence) or (
        isinstance(container, type) and issubclass(container, (list, tuple)) and container is not str
    ):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(fits(v, item) for v in value)
    if container in (dict, Mapping, typing.Mapping) or (isinstance(container, type) and issubclass(container, dict)):
        return isinstance(value, Mapping)
    return True


def describe(hint: Any) -> str:
    """A hint in words: "an integer", "true or false", "a pair [a, b]", "one of 'x', 'y'", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        tail = " (or null)" if type(None) in args else ""
        return " or ".join(dict.fromkeys(words)) + tail
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if hint in names:
        return names[hint]
    if (origin or hint) is tuple and args and args[-1] is not Ellipsis:
        return (
            f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
            if len(args) != 2
            else (f"a pair [{describe(args[0])}, {describe(args[1])}]")
        )
    if (origin or hint) in (list, tuple, Sequence):
        return f"a list of {describe(args[0])}s" if args else "a list"
    if (origin or hint) in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------- targets
def parameters(target: str) -> tuple[dict[str, Any], bool] | None:
    """The keyword parameters of a `_target_` and their hints, and whether it takes any other keyword; None when
    the target cannot be inspected. `X.from_config` partials take the arguments of X's constructor."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"_target_={target} cannot be imported; check the spelling of the class") from None
    if inspect.ismethod(obj) and obj.__name__ == "from_config":
        obj = obj.__self__
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # hints that do not evaluate: check the names only
        hints = {}
    params, kwargs = {}, False
    for name, p in signature.parameters.items():
        if name == "self" or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            kwargs = True
            continue
        params[name] = hints.get(name, Any)
    return params, kwargs


def check_targets(values: Mapping[str, Any], prefix: str = "") -> None:
    """Check each `_target_` node's keys against its constructor (names, and values against type hints)."""
    for key, node in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(node, Mapping) or path == "hydra":
            continue
        check_targets(node, path)
        target = node.get("_target_")
        if not isinstance(target, str):
            continue
        found = parameters(target)
        if found is None:
            continue
        params, kwargs = found
        skip = NOT_ARGUMENTS.get(path, ())
        name = target.split(".from_config")[0].rsplit(".", 1)[-1]
        for arg, value in node.items():
            if arg.startswith("_") or arg in skip:
                continue
            if arg not in params:
                if kwargs:
                    continue
                close = difflib.get_close_matches(arg, list(params), n=1, cutoff=0.6)
                names = ", ".join(list(params)[:8]) + (", ..." if len(params) > 8 else "")
                hint = f"; did you mean {path}.{close[0]}?" if close else f"; {name} takes {names}"
                raise ConfigError(f"{path}.{arg}={_show(value)} is not an argument of {name}{hint}")
            if value != MISSING and not fits(value, params[arg]):
                raise ConfigError(f"{path}.{arg}={_show(value)} must be {describe(params[arg])} ({name}'s {arg})")


def known_keys(values: Mapping[str, Any]) -> list[str]:
    """Every dotted key of a config, and the constructor parameters of its `_target_` nodes."""
    keys = [k for k, _ in _leaves(values)]
    keys += [k for k, v in _nodes(values) if not isinstance(v, Mapping) or not v]

    for path, node in _nodes(values):
        if isinstance(node, Mapping) and isinstance(node.get("_target_"), str):
            try:
                found = parameters(node["_target_"])
            except ConfigError:
                found = None
            if found:
                keys += [f"{path}.{p}" for p in found[0]]
    return sorted(set(keys))


def _nodes(node: Any, prefix: str = ""):
    if isinstance(node, Mapping):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, v
            yield from _nodes(v, path)


def suggest(key: str, values: Mapping[str, Any]) -> str | None:
    """The known key closest to a misspelt one (`trainer.max_step` -> `trainer.max_steps`), if any is close."""
    keys = known_keys(values)
    if key in keys:
        return key
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    for pool in (siblings, keys):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.75)
        if close:
            return close[0]
    return None


# ------------------------------------------------------------------------------------------ train.py
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")
RULES["trainer.precision"] = Rule(
    str | int, lambda v: str(v) in PRECISIONS, f"is not supported; use one of {', '.join(PRECISIONS)}"
)


def validate_train_config(cfg: DictConfig) -> None:
    """Everything about a training config that needs no built object, run before any work.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    from latentdiff.config import check_sampler_fits

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
    if precision == "transformer-engine" and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "trainer.precision=transformer-engine needs NVIDIA's transformer_engine, which is not installed; "
            "use bf16-mixed, or install transformer-engine"
        )
