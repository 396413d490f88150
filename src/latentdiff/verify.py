"""`python -m latentdiff.verify path=<latent store | checkpoint | run directory>`: recompute the checksums.

- a latent store: store.json's SHA-256 of each shard's index and of empty_text.npy, then every shard's files
  (the same check an extraction re-run does before it says "nothing to do", and `data.verify=true` before
  training);
- a checkpoint (`.ckpt`, or any zip-format torch file): the CRC-32 `torch.save` recorded for each record (the
  same check every checkpoint load does);
- a run directory: each of its checkpoints (`last.ckpt`, `step_*.ckpt`, `best_fid.ckpt`, ...).

Prints one line per checked item with what was read and how fast; a damaged file is one `error:` line naming
it, exit status 1. A path that is none of these is exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from latentdiff.checkpoint import verify_checkpoint
from latentdiff.data.store import StoreError, verify_store
from latentdiff.errors import ConfigError


class Damaged(Exception):
    """A file whose content no longer matches its recorded checksum."""


def verify_path(path: str | Path) -> list[dict[str, Any]]:
    """Verify a store, a checkpoint or a run directory's checkpoints (see the module docstring).

    Returns:
        One record per checked item: {"path", "kind", "bytes", "seconds"}.

    Raises:
        ConfigError: the path is none of these.
        Damaged: a checksum does not match (the message names the file).
    """
    path = Path(path)
    if path.is_dir() and (path / "store.json").is_file():
        try:
            result = verify_store(path)
        except StoreError as err:
            raise Damaged(str(err)) from None
        return [{"path": str(path), "kind": "latent store", **result}]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.ckpt") if p.is_file())
        if not files:
            raise ConfigError(f"path={path} holds neither a latent store (store.json) nor checkpoints (*.ckpt)")
        return [record for file in files for record in verify_path(file)]
    if not path.is_file():
        raise ConfigError(f"path={path} does not exist; give a latent store, a checkpoint or a run directory")
    start = time.perf_counter()
    try:
        size = verify_checkpoint(path, "path")
    except ConfigError as err:
        raise Damaged(str(err)) from None
    if size == 0:
        raise ConfigError(f"path={path} is not a zip-format torch file (no checksums to verify)")
    return [{"path": str(path), "kind": "checkpoint", "bytes": size, "seconds": time.perf_counter() - start}]


def _run(argv: list[str]) -> list[dict[str, Any]]:
    paths = [a.split("=", 1)[1] if a.startswith("path=") else a for a in argv]
    if not paths or any(a.startswith("-") for a in paths):
        raise ConfigError("path=??? is missing; set path=<latent store | checkpoint | run directory>")
    records = []
    for path in paths:
        for record in verify_path(path):
            rate = record["bytes"] / record["seconds"] / 1e9 if record["seconds"] > 0 else 0.0
            extra = f", {record['unrecorded']} shards without checksums" if record.get("unrecorded") else ""
            print(
                f"ok: {record['path']} ({record['kind']}): {record['bytes'] / 1e9:.2f} GB in "
                f"{record['seconds']:.1f} s ({rate:.2f} GB/s){extra}",
                flush=True,
            )
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    from latentdiff.cli import plain_entry

    try:
        return plain_entry(_run, argv, __doc__)
    except Damaged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
