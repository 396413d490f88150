"""What a `_target_` node of a config may hold: its constructor's parameter names and type hints.

- `parameters(target)`: the keyword parameters of a class (or of the class of an `X.from_config` partial) and
  their hints;
- `fits(value, hint)` / `describe(hint)`: whether a plain config value can be a hint, and the hint in words;
- `check_targets(values)`: every `_target_` node's keys against its constructor (a misspelt `+model.patch_sise`
  is refused with "did you mean model.patch_size?", a string where a bool is expected with the type);
- `suggest(key, values)`: the known key closest to a misspelt one, for the command line's errors.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentdiff.errors import ConfigError, shorten

MISSING = "???"
# keys that a `_target_` node holds but the project takes off before calling the constructor
NOT_ARGUMENTS = {"model": ("pretrained",)}


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
    if hint in (str, Path) or hint is os.PathLike:
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


def parameters(target: str) -> tuple[dict[str, Any], bool] | None:
    """The keyword parameters of a `_target_` and their hints, and whether it takes any other keyword; None when
    the target cannot be inspected. `X.from_config` partials take the arguments of X's constructor."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"_target_={target} cannot be imported; check the spelling of the class") from None
    from_config = inspect.ismethod(obj) and obj.__name__ == "from_config"
    if from_config:
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
    # diffusers' `from_config` ignores the arguments its class does not take (the training scheduler's whole
    # config goes through it, and a sampler preset may set one that another sampler lacks): names pass, types not
    params, kwargs = {}, from_config
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
    keys = [k for k, _ in leaves(values)]
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
    """The known key closest to a misspelt one (`trainer.max_step` -> `trainer.max_steps`), if any is close.

    A near-exact sibling among the config's own keys (a missing or extra letter) is answered without importing
    any class; otherwise the constructor parameters of the `_target_` nodes are read too (which imports them).
    """
    own = [k for k, _ in leaves(values)]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if key in own:
        return key
    own_siblings = [k for k in own if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    near = difflib.get_close_matches(key, own_siblings, n=1, cutoff=0.9)
    if near:
        return near[0]
    keys = known_keys(values)
    if key in keys:
        return key
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    for pool in (siblings, keys):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.75)
        if close:
            return close[0]
    return None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else shorten(value)


def leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every leaf; a list of plain values is one leaf (a list of dicts is walked)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and any(isinstance(v, (Mapping, list)) for v in node):
        for i, v in enumerate(node):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node
