"""One run per directory: `<run>/.lock`, created with `O_EXCL` by the run's first process before it writes anything.

A single run takes it before Hydra starts (`rundir.claim_before_hydra`), a sweep job when it starts; it is removed
when the run ends. A second run into the same directory is refused in one line (`RunInUse`) while the holder
lives. A lock left by a crash is stale, and taken over, when its process is gone (same host: the pid no longer
runs, or runs another program), when its heartbeat (the file's mtime, touched every `HEARTBEAT_S`) is older than
`STALE_AFTER_S` (another host), or when it was written by an earlier start of the same SLURM job (a requeue).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from latentdiff.errors import RunInUse

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_MISSING = object()
# the run directories this process holds the lock of (`claim`)
_CLAIMS: dict[str, RunLock] = {}


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
