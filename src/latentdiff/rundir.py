"""Run directories: how a new one is named and claimed, which one `resume` continues, and what is removed after
an error.

- `run_dir(base, resume)` (the `ld.run_dir` resolver of `conf/hydra/default.yaml`): a new run gets
  `<base>/<date>_<time>`, created here with `mkdir` (atomic): a second run started in the same second gets
  `<date>_<time>_1`. `resume=auto` continues the newest run of `<base>`: one that holds checkpoints, or one that
  was stopped before its first logged step (only `config.yaml`), which restarts from step 0 in its own folder
  (a run that trained without saving a checkpoint cannot be continued, and is left as it is).
- The lock that keeps two runs out of one directory is `runlock.py`; a single run takes it here, before
  Hydra writes into its directory (`claim_before_hydra`).
- `latest_checkpoint(run_dir)`: the checkpoint a resumed run continues from (the highest step; a truncated or
  corrupt one is passed over).
- `NEW_RUN_DIRS`: the directories this process created; only those (and the empty parents it made) are removed
  after an error.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from latentdiff.checkpoint import checkpoint_step, checkpoints, verify_checkpoint
from latentdiff.distributed import rank_zero_process
from latentdiff.errors import ConfigError, DiskFullError, shorten
from latentdiff.runlock import LOCK, claim, release_claims

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 20  # a run directory needs at least this much to start (Hydra's record, the config)

# (base, resume) -> the run directory chosen before Hydra started, which Hydra's `ld.run_dir` then returns
_CHOSEN: dict[tuple[str, str], str] = {}
_REMEMBER = False
# run directories this process chose as new ones, and the parents it made for them: only those may be removed
NEW_RUN_DIRS: set[str] = set()
_MADE_PARENTS: list[str] = []


# ------------------------------------------------------------------------------------------ resume lookup
def latest_checkpoint(run_dir: str | Path, verify: bool = False) -> Path | None:
    """The readable checkpoint of `run_dir` with the highest step (ties: the newest file); None if none.

    Args:
        verify: take the highest one whose CRC-32s match (`verify_checkpoint`), logging each corrupt one passed.
    """
    steps = [(checkpoint_step(p), p.stat().st_mtime, p) for p in checkpoints(run_dir)]
    for _, _, path in sorted((s for s in steps if s[0] >= 0), reverse=True):
        if not verify:
            return path
        try:
            verify_checkpoint(path, "resume")
            return path
        except ConfigError as err:
            log.warning("%s; continuing from the run's previous checkpoint instead", err)
    return None


# ------------------------------------------------------------------------------------------ naming
def no_resume(resume: Any) -> bool:
    """Whether a `resume` value means "start a new run" (null, false, empty)."""
    return resume is None or resume is False or str(resume) in ("", "null", "None", "false", "False")


def run_dir(base: str, resume: Any) -> str:
    """The run directory for `hydra.run.dir`.

    Args:
        base: `<log_dir>/<name>`.
        resume: null (a new `<base>/<date>_<time>`), "auto" (the newest run under `base`: see the module
            docstring; else a new one), or a run directory.
    """
    key = (str(base), str(resume))
    if key in _CHOSEN:  # chosen (and claimed) before Hydra started: `claim_before_hydra`
        return _CHOSEN[key]
    if no_resume(resume):
        chosen = _new_run_dir(base)
    elif str(resume) == "auto":
        runs = [(_last_activity(p), p.name, p) for p in Path(base).glob("*") if p.is_dir()]
        runs = [r for r in runs if r[0] is not None]
        chosen = str(max(runs)[2]) if runs else _new_run_dir(base)
    else:
        chosen = str(Path(resume).expanduser().resolve())
    if _REMEMBER:
        _CHOSEN[key] = chosen
    return chosen


def _last_activity(run: Path) -> float | None:
    """When a run directory last saved its state (its newest checkpoint, or config.yaml for a run stopped before
    its first checkpoint); None for a folder that holds no run to continue."""
    files = checkpoints(run)
    if files:
        return max(f.stat().st_mtime for f in files)
    return (run / "config.yaml").stat().st_mtime if stopped_before_first_checkpoint(run) else None


# what a run writes before its first logged step: a directory holding only these restarts from step 0
_BEFORE_FIRST_STEP = {"config.yaml", ".hydra", "train.log", LOCK, LOCK + ".takeover", "metrics.csv"}


def stopped_before_first_checkpoint(run: Path) -> bool:
    """A run directory whose run wrote its config and was stopped before it logged a step or saved a checkpoint
    (restartable: nothing is lost by starting it again). A run that trained without saving a checkpoint (killed
    between checkpoints, or `callbacks.checkpoint=null`) is not: its metrics and grids are kept."""
    if not (run / "config.yaml").is_file() or checkpoints(run):
        return False
    if any(p.name not in _BEFORE_FIRST_STEP for p in run.iterdir()):
        return False
    return not _logged_steps(run)


def _logged_steps(run: Path) -> bool:
    """Whether a run directory's metrics.csv holds rows (the run trained)."""
    metrics = run / "metrics.csv"
    try:
        with open(metrics, "rb") as f:
            return len(f.read(1 << 16).splitlines()) > 1
    except OSError:
        return False


def _new_run_dir(base: str) -> str:
    """Create `<base>/<date>_<time>` (or `_1`, `_2`, ... when another run took that name) and return it."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    _make_parents(Path(base))
    for n in range(1000):
        path = Path(base) / (stamp if n == 0 else f"{stamp}_{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        NEW_RUN_DIRS.add(os.path.abspath(path))
        return str(path)
    raise ConfigError(f"paths.log_dir: 1000 runs named {Path(base) / stamp} exist; choose another name=")


def _make_parents(folder: Path) -> None:
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    _MADE_PARENTS.extend(os.path.abspath(p) for p in missing)


def remove_new_run_dir(run: Path) -> None:
    """After an error: remove a run directory this process created (and the empty parents it made), unless it
    holds work (a checkpoint, logged steps: a disk that filled up mid-run keeps its metrics and grids) or a lock
    (another run's: it is using the directory)."""
    if os.path.abspath(run) not in NEW_RUN_DIRS or not run.is_dir() or (run / LOCK).exists():
        return
    if checkpoints(run) or _logged_steps(run):
        return
    shutil.rmtree(run, ignore_errors=True)
    NEW_RUN_DIRS.discard(os.path.abspath(run))
    _remove_empty_parents()


def _remove_empty_parents() -> None:
    for parent in sorted(_MADE_PARENTS, key=len, reverse=True):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(parent)  # only when empty


@atexit.register
def _remove_unused() -> None:
    """A run directory chosen but never used (`--cfg hydra --resolve`, a config error) is removed when empty."""
    release_claims()
    for path in NEW_RUN_DIRS:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    _remove_empty_parents()


def hydra_subdir(run: str) -> str:
    """Hydra's record folder in a run directory: `.hydra` in a new one, `.hydra/resume_<time>` in one that
    already holds a run or a record (the first launch's record is never overwritten)."""
    run_dir = Path(run)
    markers = (".hydra", "config.yaml", "metrics.csv", "last.ckpt")  # not train.log: Hydra opens it first
    if any((run_dir / m).exists() for m in markers) or any(run_dir.glob("*.ckpt")):
        return f".hydra/resume_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    return ".hydra"


def check_location(cfg: Any, args: list[str]) -> None:
    """Before Hydra makes the run directory: `resume`, `ckpt_path`, `paths.log_dir` and an explicit
    `hydra.run.dir` must name what they are meant to (Hydra would create a missing `resume` folder, and fail on
    a file with a traceback).

    Raises:
        ConfigError: naming the key, the value and what it must be.
    """
    from omegaconf import OmegaConf

    name = OmegaConf.select(cfg, "name", default=None)
    name = name if isinstance(name, str) or name is None or isinstance(name, bool) else str(name)  # name=2024, nan
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise ConfigError(
            f"name={shorten(repr(name))} must be a folder name (at most 200 characters, no '/'); runs go to "
            "<paths.log_dir>/<name>/"
        )
    resume = OmegaConf.select(cfg, "resume", default=None)
    if not no_resume(resume) and str(resume) != "auto":
        path = Path(str(resume)).expanduser()
        if path.is_file():
            raise ConfigError(
                f"resume={resume} is a file; resume takes a run directory (a checkpoint: ckpt_path={resume})"
            )
        if not path.is_dir():
            raise ConfigError(
                f"resume={resume} does not exist; use resume=auto (the newest run of outputs/<name>), "
                "an existing run directory, or ckpt_path=<checkpoint file>"
            )
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", default=None)
    if ckpt_path and Path(str(ckpt_path)).expanduser().is_dir():
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a folder; ckpt_path takes a checkpoint file (a run: resume={ckpt_path})"
        )
    explicit = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    folders = [("paths.log_dir", OmegaConf.select(cfg, "paths.log_dir", default=None))]
    folders += [("hydra.run.dir", value) for value in explicit]
    for key, value in folders:
        if value is None:
            continue
        for folder in (Path(str(value)).expanduser(), *Path(str(value)).expanduser().parents):
            if folder.exists():
                if not folder.is_dir():
                    inside = "" if str(folder) == str(Path(str(value)).expanduser()) else f" ({folder} is a file)"
                    raise ConfigError(f"{key}={value} is not a folder{inside}; runs are written into folders")
                free = shutil.disk_usage(folder).free
                if free < MIN_FREE_BYTES:  # Hydra would fail writing its record, with a traceback
                    raise DiskFullError(
                        errno.ENOSPC,
                        f"no space left on the device of {key}={value} ({free / 1e3:.0f} kB free); nothing was "
                        "written: free some space or write elsewhere",
                    )
                break
    for value in explicit:  # Hydra is about to create it for this process: removed again after an error
        path = Path(value).expanduser()
        if not path.exists():
            _MADE_PARENTS.extend(os.path.abspath(p) for p in path.parents if not p.exists())
            NEW_RUN_DIRS.add(os.path.abspath(path))
    claim_before_hydra(cfg)


def claim_before_hydra(cfg: Any) -> None:
    """Choose the run directory of a single run and take its lock before Hydra writes its record there, so a
    second run into a directory in use is refused before it touches anything (rank 0 only; ranks > 0 run in
    rank 0's directory). Hydra's `ld.run_dir` then returns the same directory (`_CHOSEN`)."""
    global _REMEMBER
    from omegaconf import OmegaConf

    if not rank_zero_process():
        return
    _REMEMBER = True
    try:
        folder = OmegaConf.select(cfg, "hydra.run.dir", default=None)
    except Exception:  # a run.dir only Hydra resolves (`${hydra:...}`): the run claims it when it starts
        return
    finally:
        _REMEMBER = False
    if isinstance(folder, str) and folder:
        claim(folder)


def reset() -> None:
    """The end of an entry point: release this process's locks and forget the directories it chose."""
    release_claims()
    _CHOSEN.clear()
