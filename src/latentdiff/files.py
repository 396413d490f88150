"""Atomic file writing: a file is either its old complete self or its new complete self, never half-written.

Every write goes to `.<name>.tmp-<pid>` in the same folder (same file system, so the rename is atomic), is
flushed to disk, renamed over `name`, and the folder entry is flushed too. On any error the temporary file is
removed and an older `name` is left as it was. One implementation for JSON records, torch files (checkpoints)
and array parts (samples, latent shards' side files).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """The temporary file a write of `path` goes through (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; when the block ends without error it replaces `path`.

    Args:
        path: the file to (re)write; its folder is created if needed.
        mode: `"wb"` or `"w"`.

    Yields:
        the open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only then); skipped where the folder cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some network file systems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, payload: Any, indent: int | None = 1) -> None:
    """Write `payload` as JSON, atomically."""
    with replacing(path, "w") as f:
        json.dump(payload, f, indent=indent)


def save_array(path: str | Path, array: Any) -> None:
    """`numpy.save` into `path` (the name is kept as given: no `.npy` appended), atomically."""
    import numpy as np

    with replacing(path) as f:
        np.save(f, array)


@contextlib.contextmanager
def crc32_on() -> Iterator[None]:
    """`torch.save` writes a CRC-32 for every zip record (torch's default, set explicitly for this block)."""
    from torch.serialization import get_crc32_options, set_crc32_options

    before = get_crc32_options()
    set_crc32_options(True)
    try:
        yield
    finally:
        set_crc32_options(before)


def save_torch(payload: Any, path: str | Path) -> None:
    """`torch.save` with CRC-32s, atomically.

    Raises:
        OSError or RuntimeError: as `torch.save` raises them (torch's zip writer turns ENOSPC into a RuntimeError
            on close); nothing is left behind and an older `path` is intact.
    """
    import torch

    with crc32_on(), replacing(path) as f:
        torch.save(payload, f)
