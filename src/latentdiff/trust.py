"""Building objects from a config read from a file (a checkpoint, an export) without letting the file choose code.

A checkpoint stores the resolved run config, and `sample.py` and `latentdiff.export` rebuild the backbone, the
autoencoder, the objective and the sampler from it. Hydra's `instantiate` would build any `_target_` the file
names (`builtins.open`, `torch.load(..., weights_only=False)`, ...), so a shared checkpoint could run code.
Here a stored config is built only through `ALLOWED`: the classes this project builds (its backbones,
autoencoders and objectives, and the diffusers schedulers its configs use). The whole tree is checked before
anything is built: every `_target_` must be in the list (nested ones too), `_partial_` only where the entry is a
partial (a sampler's `from_config`), no other Hydra key (`_args_`, `_recursive_`, ...), no interpolation, and
only plain values (numbers, strings, booleans, None, lists, dicts). Objects are then built bottom-up by calling
the listed callables with plain Python values (Hydra's `_convert_: all`). A config stored before a class moved
names it by its old dotted path: `LEGACY_TARGETS` maps those to the current names (`canonical_target`).

`tests/unit/test_trust.py` checks that every `_target_` of `conf/model`, `conf/vae`, `conf/diffusion` and
`conf/sampler` is in the list, so a new preset of a new class fails a test until the class is added here.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from latentdiff.errors import ConfigError
from latentdiff.renames import canonical_target

# dotted name -> how it is called: "class" (called with its arguments) or "partial" (`_partial_: true`, a
# sampler's `from_config` that is called later with the training scheduler's config)
ALLOWED: dict[str, str] = {
    # backbones (latentdiff.models)
    "latentdiff.models.uvit.UViT": "class",
    "latentdiff.models.unet.UNet": "class",
    "latentdiff.models.unet.UNetCond": "class",
    "latentdiff.models.uvit2d.UVit2D": "class",
    "latentdiff.models.dit.DiT": "class",
    # frozen autoencoders (latentdiff.autoencoder)
    "latentdiff.autoencoder.IdentityAutoencoder": "class",
    "latentdiff.autoencoder.FrozenAutoencoderKL": "class",
    "latentdiff.autoencoder.FrozenVQModel": "class",
    # objectives and their training schedulers
    "latentdiff.objectives.gaussian.GaussianDiffusion": "class",
    "latentdiff.objectives.flow.FlowMatching": "class",
    "latentdiff.objectives.masked_tokens.MaskedTokens": "class",
    "diffusers.DDPMScheduler": "class",
    "diffusers.FlowMatchEulerDiscreteScheduler": "class",
    "diffusers.AmusedScheduler": "class",
    # samplers (conf/sampler): built from the training scheduler's config
    "diffusers.DDPMScheduler.from_config": "partial",
    "diffusers.DDIMScheduler.from_config": "partial",
    "diffusers.DPMSolverMultistepScheduler.from_config": "partial",
    "diffusers.DPMSolverSinglestepScheduler.from_config": "partial",
    "diffusers.EulerDiscreteScheduler.from_config": "partial",
    "diffusers.HeunDiscreteScheduler.from_config": "partial",
    "diffusers.FlowMatchEulerDiscreteScheduler.from_config": "partial",
    "diffusers.FlowMatchHeunDiscreteScheduler.from_config": "partial",
    "latentdiff.samplers.flow_sde.FlowMatchSDEScheduler.from_config": "partial",
    "latentdiff.samplers.flow_ode.FlowMatchODESolver.from_config": "partial",
    "diffusers.AmusedScheduler.from_config": "partial",
}
# Hydra keys that change how a node is built: only these are accepted, with the meaning given in the docstring
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_")
_PLAIN = (str, int, float, bool, type(None))


def _refuse(where: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {key} {what}; refusing to build it (a stored config may only name {_kinds()})")


def _kinds() -> str:
    return "latentdiff's backbones, autoencoders, objectives and samplers, and the diffusers schedulers of conf/"


def check(node: Any, where: str, key: str, built: bool = True) -> None:
    """Raise unless `node` (a stored config, plain containers) names only allowed classes and plain values.

    Args:
        node: the config (dicts, lists, plain values).
        where: what it was read from, for the message (e.g. "ckpt=/runs/a/last.ckpt").
        key: the node's config key (e.g. "vae").
        built: the node is built (`build`); False for a node whose values are only read (its `_target_` and
            Hydra keys are then plain strings that nothing builds).

    Raises:
        ConfigError: one line naming the file, the key and what is refused.
    """
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            target = canonical_target(target)
        if "_target_" in node and built:
            if not isinstance(target, str) or target not in ALLOWED:
                raise _refuse(where, f"{key}._target_={_show(target)}", "is not a class latentdiff builds")
            partial = node.get("_partial_", False)
            if partial not in (True, False) or bool(partial) != (ALLOWED[target] == "partial"):
                raise _refuse(where, f"{key}._partial_={_show(partial)}", f"does not fit {target}")
        for name, value in node.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise _refuse(where, f"{key}[{_show(name)}]", "is not a plain key")
            if built and name.startswith("_") and (name not in _HYDRA_KEYS or "_target_" not in node):
                raise _refuse(where, f"{key}.{name}", "is a Hydra instruction that a stored config may not hold")
            if name not in _HYDRA_KEYS or not built:
                check(value, where, f"{key}.{name}", built)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check(value, where, f"{key}[{i}]", built)
    elif not isinstance(node, _PLAIN):
        raise _refuse(where, f"{key}={type(node).__name__}", "is not a plain value")
    elif isinstance(node, str) and "${" in node:
        raise _refuse(where, f"{key}={_show(node)}", "is an interpolation")


# the groups of a run config that sampling and export read from a checkpoint: built, or only read
STORED_GROUPS = {"model": True, "vae": True, "diffusion": True, "sampler": True, "data": False, "module": False}


def check_stored(config: dict, where: str) -> None:
    """`check` every group of a stored run config that sampling or export reads (`STORED_GROUPS`), after
    renaming, in place, the old `_target_` names of its built groups to the current ones (`LEGACY_TARGETS`)."""
    for group, built in STORED_GROUPS.items():
        value = config.get(group)
        if value is not None and not isinstance(value, dict):
            raise _refuse(where, f"{group}={_show(value)}", "is not a config group (a mapping)")
        if built:
            _rename_legacy(value)
        check(value, where, group, built)


def _rename_legacy(node: Any) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            node["_target_"] = canonical_target(node["_target_"])
        for value in node.values():
            _rename_legacy(value)
    elif isinstance(node, list):
        for value in node:
            _rename_legacy(value)


def build(node: Any, where: str, key: str) -> Any:
    """`check` the node, then build it bottom-up from `ALLOWED` (see the module docstring).

    Returns:
        The built object; containers without `_target_` come back as plain lists and dicts.
    """
    check(node, where, key)
    roles = _ROLES.get(key)
    target = node.get("_target_") if isinstance(node, dict) else None
    target = canonical_target(target) if isinstance(target, str) else target
    if roles is not None and not (isinstance(target, str) and target.startswith(roles)):
        raise _refuse(where, f"{key}._target_={_show(target)}", f"is not a {key} class (one of {', '.join(roles)}*)")
    try:
        return _build(node)
    except (ConfigError, OSError, ValueError):  # one line naming the key already (`errors.user_errors`)
        raise
    except Exception as err:  # what a class raises for a value it never expected: TypeError, NotImplementedError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where}: {key} could not be built ({type(err).__name__}: {first})") from None


# what each built group must be: its class's dotted-name prefix
_ROLES = {
    "model": ("latentdiff.models.",),
    "vae": ("latentdiff.autoencoder.",),
    "diffusion": ("latentdiff.objectives.",),
    "diffusion.scheduler": ("diffusers.",),
    "sampler.scheduler": ("diffusers.", "latentdiff.samplers."),
}


def _build(node: Any) -> Any:
    if isinstance(node, (list, tuple)):
        return [_build(v) for v in node]
    if not isinstance(node, dict):
        return node
    kwargs = {k: _build(v) for k, v in node.items() if k not in _HYDRA_KEYS}
    if "_target_" not in node:
        return kwargs
    target = canonical_target(node["_target_"])
    fn = locate(target)
    return functools.partial(fn, **kwargs) if ALLOWED[target] == "partial" else fn(**kwargs)


def locate(target: str) -> Any:
    """The object of an allowed dotted name (`module.Class` or `module.Class.method`)."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
