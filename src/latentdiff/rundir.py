"""Run directories: how a new one is named and claimed, which one `resume` continues, and the lock that keeps
two runs out of one directory.

- `run_dir(base, resume)` (the `ld.run_dir` resolver of `conf/hydra/default.yaml`): a new run gets
  `<base>/<date>_<time>`, created here with `mkdir` (atomic): a second run started in the same second gets
  `<date>_<time>_1`. `resume=auto` continues the newest run of `<base>`: one that holds checkpoints, or one that
  was stopped before its first logged step (only `config.yaml`), which restarts from step 0 in its own folder
  (a run that trained without saving a checkpoint cannot be continued, and is left as it is).
- `RunLock`: `<run>/.lock`, created with `O_EXCL` by the run's first process before it writes anything (a single
  run: before Hydra starts, `claim_before_hydra`; a sweep job: when it starts), removed when the run ends. A
  second run into the same directory is refused in one line while the holder lives. A lock left by a crash is
  stale, and taken over, when its process is gone (same host: the pid no longer runs, or runs another program),
  when its heartbeat (the file's mtime, touched every `HEARTBEAT_S`) is older than `STALE_AFTER_S` (another
  host), or when it was written by an earlier start of the same SLURM job (a requeue).
- `NEW_RUN_DIRS`: the directories this process created; only those (and the empty parents it made) are removed
  after an error.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from latentdiff.checkpoint import checkpoints
from latentdiff.errors import ConfigError, DiskFullError, RunInUse, shorten

LOCK = ".lock"
MIN_FREE_BYTES = 1 << 20  # a run directory needs at least this much to start (Hydra's record, the config)
_MISSING = object()
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

# the run directories this process holds the lock of (`claim`)
_CLAIMS: dict[str, RunLock] = {}
# (base, resume) -> the run directory chosen before Hydra started, which Hydra's `ld.run_dir` then returns
_CHOSEN: dict[tuple[str, str], str] = {}
_REMEMBER = False
# run directories this process chose as new ones, and the parents it made for them: only those may be removed
NEW_RUN_DIRS: set[str] = set()
_MADE_PARENTS: list[str] = []


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

    from latentdiff.distributed import rank_zero_process

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


# -------------------------------------------------------------------------------------------- lock
def _identity() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux); tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (checked on this host only)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)


def stale(holder: dict[str, Any] | None, age_s: float) -> bool:
    """Whether a lock's holder is gone (see the module docstring)."""
    if holder is None:  # unreadable: written by a process killed mid-write
        return age_s > 5.0
    me = _identity()
    same_job = holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]
    if same_job and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]:
        return True  # an earlier start of this requeued job
    if holder.get("host") == me["host"]:
        return not _alive(holder)
    return age_s > STALE_AFTER_S


class RunLock:
    """The claim of one run directory by one run (see the module docstring); a context manager.

    Args:
        run_dir: the run directory (created if missing).
        key: the config key named in the refusal.
    """

    def __init__(self, run_dir: str | Path, key: str = "paths.output_dir"):
        self.run_dir, self.key = Path(run_dir), key
        self.path = self.run_dir / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held, self._made, self._ino = False, False, None

    def acquire(self) -> RunLock:
        """Claim the directory, taking over a stale lock.

        A stale lock is taken over under `.lock.takeover` (itself created with `O_EXCL`), and removed only if it
        is still the same file (inode and record) that was judged stale: two runs that find one stale lock
        never both proceed, and a lock another run has just created is never removed.

        Raises:
            RunInUse: another live run holds it (naming its process, host and start).
        """
        self._made = not self.run_dir.exists()  # an API caller's new run directory: removed again if left empty
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age, ino = self._read()
                if holder is _MISSING:  # released meanwhile: try again
                    continue
                if not stale(holder, age):
                    raise self._in_use(holder) from None
                self._take_over(holder, ino)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_identity(), f)
                f.flush()
                self._ino = os.fstat(f.fileno()).st_ino
            self.held = True
            _CLAIMS[os.path.abspath(self.run_dir)] = self
            self._thread = threading.Thread(target=self._beat, name="latentdiff-run-lock", daemon=True)
            self._thread.start()
            return self
        holder = self._read()[0]
        raise self._in_use(None if holder is _MISSING else holder)

    def _take_over(self, holder: Any, ino: int | None) -> None:
        """Remove the stale lock `holder` (inode `ino`) if it is still there, under the takeover mutex."""
        mutex = self.path.with_name(LOCK + ".takeover")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another run is taking it over; a mutex left by a crash is old
            with contextlib.suppress(OSError):
                if time.time() - mutex.stat().st_mtime > 10.0:
                    mutex.unlink()
            time.sleep(0.05)
            return
        try:
            now, _, now_ino = self._read()
            if now_ino == ino and now == holder:  # still the stale one
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            mutex.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock (only ours: the same file this run created)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            _CLAIMS.pop(os.path.abspath(self.run_dir), None)
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._ino:
                    self.path.unlink()
        if self._made:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when the run wrote nothing (an error before any work)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _read(self) -> tuple[Any, float, int | None]:
        """(the holder's record, None when unreadable, or _MISSING; the lock's age in seconds; its inode)."""
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return _MISSING, 0.0, None
        except OSError:
            return None, 0.0, None
        age = time.time() - st.st_mtime
        try:
            holder = json.loads(text)
        except ValueError:  # being written, or written by a process killed mid-write
            return None, age, st.st_ino
        return (holder if isinstance(holder, dict) else None), age, st.st_ino

    def _in_use(self, holder: dict[str, Any] | None) -> RunInUse:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if holder
            else "a run that is starting"
        )
        return RunInUse(
            f"{self.key}={self.run_dir} is in use by another run ({who}); wait for it to end, or start a new run "
            f"in its own directory (leave hydra.run.dir unset); if that run is gone, delete {self.path}"
        )


def claim(run_dir: str | Path, key: str = "paths.output_dir") -> RunLock:
    """The lock of `run_dir` held by this process: the one it already holds (claimed before Hydra wrote into the
    directory, `claim_before_hydra`), else a newly acquired one."""
    held = _CLAIMS.get(os.path.abspath(run_dir))
    return held if held is not None and held.held else RunLock(run_dir, key).acquire()


def release_claims() -> None:
    """Release every lock this process holds (after an error; before its new run directory is removed)."""
    for lock in list(_CLAIMS.values()):
        lock.release()
