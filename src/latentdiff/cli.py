"""What `train.py`, `sample.py` and `evaluate.py` share: resolvers, the Hydra entry and one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentdiff.config import ConfigError, check_group_choices, register_resolvers

# the repository's conf/ (the package is installed from the repository, editable)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# what Hydra itself writes into a new run directory before the task starts
_HYDRA_FILES = {".hydra"}


def _remove_if_untouched(run_dir: Path) -> None:
    """Delete a run directory this process chose as a new one (`ld.run_dir`) if it holds nothing but what
    Hydra wrote at start-up (.hydra, *.log). A directory that existed before is never removed."""
    from latentdiff.checkpoint import NEW_RUN_DIRS

    if not run_dir.is_dir() or os.path.abspath(run_dir) not in NEW_RUN_DIRS:
        return
    if all(p.name in _HYDRA_FILES or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _undo_hydra_writes(run_dir: Path, subdir: str | None) -> None:
    """After an error: remove what Hydra wrote into a run directory at start-up, so that a directory that
    held a run before is left exactly as it was (a `.hydra/resume_*` record, an empty new train.log)."""
    from latentdiff.checkpoint import NEW_RUN_DIRS

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
    """A `key=value` command without Hydra (`latentdiff.flops`, `latentdiff.report`): `--help` prints `doc`;
    a `ConfigError` is one line on stderr and exit status 2 (LATENTDIFF_DEBUG=1: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return None
    try:
        return run(argv)
    except ConfigError as err:
        if os.environ.get("LATENTDIFF_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_overrides(args: list[str], config_dir: Path, config_name: str) -> None:
    """Compose the config once before Hydra runs, so that an override Hydra rejects (a misspelt key, a bad
    value type) is one line naming it instead of Hydra's multi-line report. Sweeps (`-m`) are left to Hydra.

    Raises:
        ConfigError: the first line(s) of Hydra's message, joined.
    """
    if any(a.startswith(("-", "hydra.mode=", "sweep=")) for a in args):  # flags, sweeps: Hydra's
        return
    overrides = [a for a in args if "=" in a or a.startswith("~")]
    if any(any(mark in a for mark in _SWEEP_MARKS) for a in overrides):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra's override and composition errors
        if "Ambiguous value for argument" in str(err):  # a comma list: a sweep if the config is a multirun
            return
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(("full_key", "object_type", "Set the environment"))]
        raise ConfigError("; ".join(lines[:3]) or type(err).__name__) from None
    finally:
        GlobalHydra.instance().clear()


def hydra_entry(
    run: Callable[..., Any],
    config_dir: Path,
    config_name: str,
    cleanup_run_dir: bool = True,
    pass_overrides: bool = False,
) -> None:
    """Run `run(cfg)` under `@hydra.main`, with one-line errors for configuration mistakes.

    With `pass_overrides`, `run(cfg, overrides)` also gets the command-line overrides (`key=value` strings).

    A `ConfigError` prints `error: <message>` on stderr, removes the run directory if nothing but Hydra's
    start-up files are in it (when `cleanup_run_dir`), and exits with status 2. Set LATENTDIFF_DEBUG=1 to get
    the traceback.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from latentdiff.distributed import install_hydra_launch
    from latentdiff.module import NonFiniteError

    register_resolvers()
    install_hydra_launch()  # DDP ranks > 0 re-run this job (not the sweep) into the same directory
    debug = os.environ.get("LATENTDIFF_DEBUG") == "1"
    try:
        check_group_choices(sys.argv[1:], config_dir)
        check_overrides(sys.argv[1:], config_dir, config_name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)
    def main(cfg):
        try:
            if pass_overrides:
                return run(cfg, list(HydraConfig.get().overrides.task))
            return run(cfg)
        except ConfigError as err:
            if debug:
                raise
            print(f"error: {err}", file=sys.stderr)
            hydra_cfg = HydraConfig.get()
            run_dir = Path(hydra_cfg.runtime.output_dir)
            _undo_hydra_writes(run_dir, hydra_cfg.output_subdir)
            if cleanup_run_dir:
                _remove_if_untouched(run_dir)
            sys.exit(2)
        except NonFiniteError as err:  # the run's checkpoints hold its last good state
            if debug:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(3)

    main()
