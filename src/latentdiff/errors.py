"""The ground floor: the errors a user can act on, and how their values are shown (one line, never 5,000 chars).

Every entry point prints a `ConfigError` as one line `error: <message>` with exit status 2, before any work and
leaving nothing behind; `DiskFullError` is the same for a write that ran out of space (exit status 4);
`NonFiniteError` stops a training run on NaN/Inf (exit status 3);
`NothingToDo` is not an error: its message is printed and the command exits 0 (a finished run resumed).
This module imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class ConfigError(ValueError):
    """A mistake in the run's configuration or inputs; the message is one line a user can act on."""


class StoreError(ValueError):
    """A latent store that cannot be used as asked (missing, incomplete, truncated or made differently)."""


class NonFiniteError(RuntimeError):
    """Training stopped on NaN/Inf; the message names the step, the epoch and the batch's dataset indices."""


class RunInUse(ConfigError):
    """Another live run holds the run directory: this process must not touch it (not even to clean up)."""


class DiskFullError(OSError):
    """A write ran out of space; the message names the file, the space it needed and what was kept.

    Raised as `DiskFullError(errno.ENOSPC, message)`; `str()` is the message alone.
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class NothingToDo(Exception):
    """The command has nothing to do (e.g. `resume=auto` of a finished run); the message says why."""


def shorten(value: Any, limit: int = 80) -> str:
    """`value` as it reads on a command line, cut to `limit` characters with the total length noted."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())  # one line
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}... ({len(text)} characters)"


def one_line(message: str, limit: int = 1200) -> str:
    """A message as one line: newlines joined, a runaway token (a 5,000-character value; not a long path) cut,
    then the whole."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    words = [shorten(w, 300) if len(w) > 300 else w for w in "; ".join(lines).split(" ")]
    text = " ".join(words)
    return text if len(text) <= limit else text[: limit - 30] + f"... ({len(text)} characters)"


def disk_full_message(err: OSError, path: Any = None, needed: int | None = None, kept: str = "") -> str:
    """The line for a write that ran out of space: the file, the space it needed and had, and what was kept."""
    import shutil
    from pathlib import Path

    where = Path(path if path is not None else (err.filename or "?"))
    try:
        free = shutil.disk_usage(where.parent if not where.is_dir() else where).free
    except OSError:
        free = None
    sizes = []
    if needed is not None:
        sizes.append(f"it needs about {_mb(needed)}")
    if free is not None:
        sizes.append(f"{_mb(free)} are free")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    kept = f"; {kept}" if kept else ""
    return f"no space left on the device writing {where}{detail}{kept}; free some space or write elsewhere"


def _mb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _misconfiguration() -> tuple[type, ...]:
    """Lightning's configuration error class where Lightning is loaded (an error raised before it loads cannot be
    one of them), so that checks made before the heavy imports do not import it."""
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (lightning.MisconfigurationException,) if lightning is not None else ()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors of building objects from a config into one-line `ConfigError`s.

    Constructors raise `ValueError`/`FileNotFoundError` for values a user chose (wrapped by Hydra's
    `InstantiationException`), Lightning raises `MisconfigurationException` for a trainer this machine cannot run.
    """
    from hydra.errors import InstantiationException

    try:
        yield
    except ConfigError:
        raise
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError, *_misconfiguration())):
            raise ConfigError(one_line(str(cause).splitlines()[0] if str(cause) else repr(cause))) from cause
        raise
    except (ValueError, FileNotFoundError, *_misconfiguration()) as err:
        raise ConfigError(one_line(str(err).splitlines()[0] if str(err) else repr(err))) from err
