"""What `train.py`, `sample.py` and `evaluate.py` share: resolvers, the Hydra entry and one-line errors."""

from __future__ import annotations

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
    """Delete a run directory that holds nothing but what Hydra wrote at start-up (.hydra, *.log)."""
    if not run_dir.is_dir():
        return
    if all(p.name in _HYDRA_FILES or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


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

    from latentdiff.module import NonFiniteError

    register_resolvers()
    debug = os.environ.get("LATENTDIFF_DEBUG") == "1"
    try:
        check_group_choices(sys.argv[1:], config_dir)
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
            if cleanup_run_dir:
                _remove_if_untouched(Path(HydraConfig.get().runtime.output_dir))
            sys.exit(2)
        except NonFiniteError as err:  # the run's checkpoints hold its last good state
            if debug:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(3)

    main()
