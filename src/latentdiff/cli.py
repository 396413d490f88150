"""What `train.py`, `sample.py` and `evaluate.py` share: resolvers, the Hydra entry and one-line errors."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latentdiff.config import check_group_choices, register_resolvers
from latentdiff.errors import (
    ConfigError,
    DiskFullError,
    NothingToDo,
    RunInUse,
    disk_full_message,
    one_line,
    shorten,
)

# the repository's conf/ (the package is installed from the repository, editable)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _undo_hydra_writes(run_dir: Path, subdir: str | None) -> None:
    """After an error: remove what Hydra wrote into a run directory at start-up, so that a directory that
    held a run before is left exactly as it was (a `.hydra/resume_*` record, an empty new train.log)."""
    from latentdiff.rundir import NEW_RUN_DIRS

    if subdir is None:  # an entry that writes no record and no log file (sample, evaluate, export, extract)
        return
    if subdir == ".hydra" and os.path.abspath(run_dir) not in NEW_RUN_DIRS:
        shutil.rmtree(run_dir / subdir, ignore_errors=True)  # a directory we did not create had no record
    if subdir and subdir.startswith(".hydra/resume_"):
        shutil.rmtree(run_dir / subdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (run_dir / ".hydra").rmdir()  # only when it is empty now (Hydra made it for this record)
    log_file = run_dir / "train.log"
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink(missing_ok=True)


_SWEEP_MARKS = ("glob(", "range(", "choice(", "interval(", "tag(", "sort(", "shuffle(")


def plain_entry(run: Callable[[list[str]], Any], argv: list[str] | None, doc: str | None) -> Any:
    """A `key=value` command without Hydra (`latentdiff.flops`, `latentdiff.report`, `latentdiff.verify`): `--help`
    prints `doc`; a `ConfigError` is one line on stderr and exit status 2 (LATENTDIFF_DEBUG=1: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return None
    try:
        return run(argv)
    except ConfigError as err:
        if os.environ.get("LATENTDIFF_DEBUG") == "1":
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)


def check_overrides(args: list[str], config_dir: Path, config_name: str) -> DictConfig | None:
    """Compose the config once before Hydra runs, so that an override Hydra rejects (a misspelt key, a bad
    value type) is one line naming it instead of Hydra's multi-line report. Sweeps (`-m`) are left to Hydra.

    Returns:
        The composed config (with its `hydra` node, unresolved), or None for a sweep or a Hydra flag.

    Raises:
        ConfigError: the first line(s) of Hydra's message; for a key that is not in the config, the known key
            that was meant ("did you mean trainer.max_steps?").
    """
    if any(a.startswith(("-", "hydra.mode=", "sweep=")) for a in args):  # flags, sweeps: Hydra's
        return None
    overrides = [a for a in args if "=" in a or a.startswith("~")]
    if any(any(mark in a for mark in _SWEEP_MARKS) for a in overrides):
        return None
    try:
        return compose(config_dir, config_name, overrides)
    except Exception as err:  # Hydra's override and composition errors
        if "Ambiguous value for argument" in str(err):  # a comma list: a sweep if the config is a multirun
            return None
        unknown = re.search(r"Could not override '([^']+)'", str(err))
        if unknown:
            raise _unknown_key(unknown.group(1), overrides, config_dir, config_name) from None
        raise ConfigError(hydra_error_line(err)) from None


def hydra_error_line(err: BaseException) -> str:
    """Hydra's or OmegaConf's multi-line report as one line: its first lines, without the key/type/debug notes."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key", "object_type", "Set the environment"))]
    return one_line("; ".join(lines[:3]) or type(err).__name__)


def compose(config_dir: Path, config_name: str, overrides: list[str], hydra: bool = True) -> DictConfig:
    """Compose a config as its entry would (nothing run, nothing written); `hydra`: keep the `hydra` node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def _unknown_key(key: str, overrides: list[str], config_dir: Path, config_name: str) -> ConfigError:
    """The error for `key=value` where the config has no `key`: the key meant, or how to add a new one."""
    from latentdiff.signatures import suggest

    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        values = OmegaConf.to_container(compose(config_dir, config_name, rest), resolve=False)
    except Exception:  # another override is wrong too (Hydra's errors): it is reported once this one is fixed
        values = None
    meant = None
    if values is not None:
        values.pop("hydra", None)
        meant = suggest(key, values)
    shown = f"{key}={shorten(value)}"
    if meant == key:  # an argument the config does not list: Hydra's + adds it
        return ConfigError(f"{shown}: {key} is not set in the config; add it with +{key}={shorten(value)}")
    if meant:
        return ConfigError(f"{shown} is not a key of the config; did you mean {meant}?")
    return ConfigError(f"{shown} is not a key of the config (a new key is added with +{key}=...)")


def hydra_entry(
    run: Callable[..., Any] | str,
    config_dir: Path,
    config_name: str,
    cleanup_run_dir: bool = True,
    pass_overrides: bool = False,
    precheck: Callable[[DictConfig, list[str]], None] | None = None,
) -> None:
    """Run `run(cfg)` under `@hydra.main`, with one-line errors for configuration mistakes.

    `run` may be named `"module:function"`: it is imported only after the config was composed and checked, so a
    mistake is answered before the heavy libraries (Lightning, diffusers) load.

    With `pass_overrides`, `run(cfg, overrides)` also gets the command-line overrides (`key=value` strings).
    `precheck(cfg, args)` runs on the config composed before Hydra starts (nothing made yet: train.py checks
    where its run directory would go there, since Hydra creates it before the task runs).

    What is printed (one line on stderr; LATENTDIFF_DEBUG=1 raises instead, with the traceback):
    - `ConfigError`, or an OmegaConf error: `error: <message>`, exit status 2; with `cleanup_run_dir`, a run
      directory this process created is removed (`latentdiff.rundir.remove_new_run_dir`: not one that holds a
      checkpoint or another run's lock), and Hydra's records are undone;
    - `NonFiniteError`: exit status 3 (the run's checkpoints hold its last good state);
    - `DiskFullError` or any write that ran out of space: exit status 4, cleaned up as a `ConfigError`;
    - `NothingToDo`: the message without `error:`, Hydra's records undone, exit status 0.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    from latentdiff.errors import NonFiniteError
    from latentdiff.rundir import remove_new_run_dir, reset
    from latentdiff.runlock import release_claims

    register_resolvers()
    debug = os.environ.get("LATENTDIFF_DEBUG") == "1"
    try:
        check_group_choices(sys.argv[1:], config_dir)
        composed = check_overrides(sys.argv[1:], config_dir, config_name)
        if composed is not None:
            from latentdiff.validation import check_early, check_missing

            values = OmegaConf.to_container(composed, resolve=False)
            values.pop("hydra", None)
            check_missing(values, config_name)
            check_early(composed, config_name)
            if precheck is not None:
                precheck(composed, sys.argv[1:])
    except (ConfigError, DiskFullError) as err:
        if debug:
            raise
        reset()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(4 if isinstance(err, DiskFullError) else 2)

    def cleanup() -> None:
        release_claims()  # this process's lock on its run directory: it is done with it
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        _undo_hydra_writes(run_dir, hydra_cfg.output_subdir)
        if cleanup_run_dir:
            remove_new_run_dir(run_dir)

    def fail(message: str, code: int, undo: bool = True) -> None:
        print(f"error: {one_line(message)}", file=sys.stderr)
        if undo:
            cleanup()
        sys.exit(code)

    @hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)
    def main(cfg):
        nonlocal run
        try:
            if isinstance(run, str):
                module, name = run.split(":")
                run = getattr(importlib.import_module(module), name)
            if pass_overrides:
                return run(cfg, list(HydraConfig.get().overrides.task))
            return run(cfg)
        except NothingToDo as err:
            print(one_line(str(err)), file=sys.stderr)
            cleanup()
            return None
        except (ConfigError, OmegaConfBaseException) as err:
            if debug:
                raise
            fail(str(err), 2, undo=not isinstance(err, RunInUse))  # another run's directory: touch nothing
        except NonFiniteError as err:
            if debug:
                raise
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(3)
        except OSError as err:
            if debug or not (isinstance(err, DiskFullError) or err.errno == errno.ENOSPC):
                raise
            fail(str(err) if isinstance(err, DiskFullError) else disk_full_message(err), 4)

    try:
        main()
    finally:
        reset()  # locks released, chosen directories forgotten (the next entry of this process chooses anew)
