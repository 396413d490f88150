"""Checkpoints: atomic writes, safe reads, corruption checks, and refusing to resume the wrong one.

- `save_checkpoint`: written atomically (`files.save_torch`: a crash mid-write leaves the previous file intact
  and never a file that looks complete), a full disk is one line. Reads use `weights_only=True`.
- `load_checkpoint`: one-line errors for a missing, truncated or foreign file.
- `checkpoints(run_dir)`: a run directory's checkpoint files (`last.ckpt`, `step_*.ckpt`, Lightning's SLURM
  `hpc_ckpt_*.ckpt`); which one a run resumes from is `rundir.latest_checkpoint`.
- `verify_checkpoint`: the CRC-32 of every zip record, which `torch.save` writes and `torch.load` never checks;
  every full read of a checkpoint or weights file verifies them.
- `check_resumable(stored, cfg)`: resuming another backbone or data shape is an error naming the key.
"""

from __future__ import annotations

import errno
import lzma
import mmap
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentdiff.errors import ConfigError, DiskFullError, disk_full_message
from latentdiff.files import save_torch
from latentdiff.renames import canonical_target

CHECKPOINT_PATTERNS = ("last.ckpt", "step_*.ckpt", "hpc_ckpt_*.ckpt")

# config keys a resumed run must share with its checkpoint: they decide the parameters and their shapes
RESUME_KEYS = (
    "model",
    "data.latent_size",
    "data.latent_channels",
    "data.num_classes",
    "module.num_classes",
    "diffusion._target_",
    "optim.optimizer._target_",
)


def save_checkpoint(payload: Any, path: str | Path) -> None:
    """Write a checkpoint atomically with CRC-32s (`files.save_torch`), which `verify_checkpoint` checks.

    Raises:
        DiskFullError: the device is full; the temporary file is removed and an older `path` is left as it was.
    """
    path = Path(path)
    try:
        save_torch(payload, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer turns ENOSPC into a RuntimeError on close
        full = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
        if full is None:
            raise
        others = [p.name for p in checkpoints(path.parent) if p != path]
        kept = (
            f"{path.name} is the previous checkpoint, intact"
            if path.exists()
            else f"the run's checkpoints ({', '.join(others)}) are intact"
            if others
            else "no checkpoint was written"
        )
        raise DiskFullError(errno.ENOSPC, disk_full_message(full, path, _payload_bytes(payload), kept)) from None


def _chain(err: BaseException) -> Iterator[BaseException]:
    """An exception and the ones it was raised from or while handling."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _payload_bytes(payload: Any, seen: set[int] | None = None) -> int:
    """The bytes of the tensor storages in a checkpoint payload, each counted once (what `torch.save` writes,
    give or take the metadata)."""
    seen = set() if seen is None else seen
    import torch  # lazily: run-directory checks import this module before any heavy import

    if torch.is_tensor(payload):
        storage = payload.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(payload, dict):
        return sum(_payload_bytes(v, seen) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(_payload_bytes(v, seen) for v in payload)
    return 0


def read_weights_file(path: str | Path, key: str, download: str, what: str = "weights file") -> Any:
    """What a weights file holds: a .safetensors file's tensors, else `read_torch_file` (`weights_only=True`).

    Raises:
        FileNotFoundError: no such file; the message says `download` (what to download) and the key to set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist; download {download} and set {key}=<file>")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return read_torch_file(path, key, what=what)


def read_torch_file(
    path: str | Path,
    key: str = "ckpt_path",
    mmap: bool = False,
    map_location: Any = "cpu",
    what: str = "checkpoint",
    verify: bool = True,
) -> Any:
    """`torch.load(path, weights_only=True)` with a one-line error for a missing, truncated or foreign file.

    Args:
        what: the kind of file, for the message ("checkpoint", "torch weights file").
        verify: also check the CRC-32 of every record of the file (`verify_checkpoint`: a bit flip inside a
            tensor loads without an error otherwise); False for cheap reads of a step or a config.

    Raises:
        ConfigError: naming `key` and the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap can only be used" in str(err)):
                raise
            payload = torch.load(path, map_location=map_location, weights_only=True)  # a legacy (non-zip) file
    except Exception as err:  # truncated zip, foreign pickle, objects weights_only refuses
        if "Weights only load failed" in str(err) and "Unsupported global" in str(err):
            raise ConfigError(
                f"{key}={path} was refused: it holds pickled objects other than tensors and plain values, which "
                "could run code (read with weights_only=True); use a file written by torch.save of tensors"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0].rstrip(".")[:160]  # torch's zip errors go on about miniz internals
        raise ConfigError(
            f"{key}={path} is not a readable {what} (truncated, corrupt or not a torch file: {first})"
        ) from None
    if verify:
        verify_checkpoint(path, key)
    return payload


ZIP_MAGIC = b"PK\x03\x04"


def _check_stored_record(m: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """CRC-32 of an uncompressed zip record read straight from the mapped file (twice zipfile's speed)."""
    header = m[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != ZIP_MAGIC:
        raise zipfile.BadZipFile(f"Bad local header for file {info.filename!r}")
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(m):
        raise zipfile.BadZipFile(f"Truncated file {info.filename!r}")
    crc, view = 0, memoryview(m)
    try:
        for offset in range(start, start + info.file_size, 1 << 26):
            crc = zlib.crc32(view[offset : min(offset + (1 << 26), start + info.file_size)], crc)
    finally:
        view.release()
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    return info.file_size


def verify_checkpoint(path: str | Path, key: str = "ckpt") -> int:
    """Check the CRC-32 that `torch.save` records for every record of a zip-format torch file.

    torch's reader does not check them, so a flipped bit inside a tensor loads silently; this reads the whole
    file once (about 2 GB/s here). A legacy (non-zip) torch file records no checksum and is not checked.

    Returns:
        The bytes checked (0 for a legacy file).

    Raises:
        ConfigError: a record whose content does not match its CRC, or a damaged zip directory; naming the file,
            the record, and the run's other checkpoints to continue from.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return 0
    size = 0
    try:
        with (
            zipfile.ZipFile(path) as archive,
            open(path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # written without checksums (torch's crc32 option off)
                    continue
                if info.compress_type != zipfile.ZIP_STORED:  # not torch's layout: let zipfile inflate and check
                    with archive.open(info) as member:
                        while block := member.read(1 << 24):
                            size += len(block)
                    continue
                size += _check_stored_record(m, info)
    # a damaged zip (bad CRC, directory, header), or a record torch never writes (compressed by a method
    # whose decoder fails, encrypted): all are corruption of a torch file
    except (
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        ValueError,
        RuntimeError,  # NotImplementedError too (an unknown compression method)
        OSError,
    ) as err:
        others = [p.name for p in checkpoints(path.parent) if p.resolve() != path.resolve()]
        alternative = f"; the run's other checkpoints: {', '.join(others)}" if others else ""
        raise ConfigError(
            f"{key}={path} is corrupt ({str(err).strip() or type(err).__name__}: its content changed after it was "
            f"written, e.g. a bit flip on disk or a damaged copy); use an intact copy{alternative}"
        ) from None
    return size


def load_checkpoint(
    path: str | Path, key: str = "ckpt_path", mmap: bool = False, verify: bool = True
) -> dict[str, Any]:
    """A latentdiff training checkpoint, read with `weights_only=True`.

    Args:
        path: the file.
        key: the config key that named it (for the error message).
        mmap: memory-map the tensors (cheap reads of the step and config of a large file).
        verify: check the file's CRC-32s (`verify_checkpoint`).

    Raises:
        ConfigError: missing, unreadable (truncated, corrupt, not a checkpoint), or not written by latentdiff.
    """
    ckpt = read_torch_file(path, key, mmap, verify=verify)
    record = ckpt.get("latentdiff") if isinstance(ckpt, dict) else None
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("state_dict"), dict)
        or not isinstance(record, dict)
        or not isinstance(record.get("config", {}), dict)
    ):
        raise ConfigError(
            f"{key}={path} is not a latentdiff training checkpoint (no run config inside); "
            "for a plain weights file use model=<preset> model.pretrained=<file>"
        )
    return ckpt


def backbone_weights(
    state_dict: dict[str, Any], use_ema: bool | None = None, where: str = "the checkpoint"
) -> tuple[dict[str, Any], str]:
    """The backbone's weights in a training checkpoint's `state_dict`: its EMA copy or the trained ("raw") one.

    Args:
        use_ema: True: the EMA weights (an error without them); False: the raw ones; None: EMA when there is one.
        where: what holds the checkpoint, for the message.

    Returns:
        the state dict keyed for the backbone, and "ema" or "raw".
    """
    has_ema = any(k.startswith("ema.model.") for k in state_dict)
    if use_ema and not has_ema:
        raise ConfigError(f"use_ema=true but {where} has no EMA weights; use use_ema=false")
    ema = has_ema if use_ema is None else use_ema
    prefix = "ema.model." if ema else "backbone."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, "ema" if ema else "raw"


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (-1 when it cannot be read); the file is not verified."""
    try:
        return int(load_checkpoint(path, mmap=True, verify=False).get("global_step", -1))
    except ConfigError:
        return -1


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run directory (not the FID-best one, which is not the run's latest state)."""
    run_dir = Path(run_dir)
    return sorted({p for pattern in CHECKPOINT_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})


# model keys that do not change the parameters (starting weights, gradient checkpointing)
_NOT_STRUCTURE = ("pretrained", "use_checkpoint")


def _select(container: dict, key: str) -> Any:
    node: Any = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if prefix.endswith("_target_") and isinstance(old, str):
        old = canonical_target(old)  # a checkpoint written before its class moved
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k in _NOT_STRUCTURE:
                continue
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [f"{prefix}={new!r} (checkpoint: {old!r})"]


def check_resumable(stored: dict | None, current: dict, key: str, path: Path) -> None:
    """Refuse to resume a checkpoint into a run whose backbone, data shape or objective differs.

    Args:
        stored: the checkpoint's resolved run config (`ckpt["latentdiff"]["config"]`).
        current: this run's resolved config.
        key, path: what named the checkpoint (for the message).

    Raises:
        ConfigError: naming the first differing key, both values, and what to do.
    """
    if stored is None:
        return
    diffs: list[str] = []
    for name in RESUME_KEYS:
        diffs += _differences(_select(stored, name), _select(current, name), name)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(
            f"{key}={path} was trained with another configuration: {diffs[0]}{more}; resume with the run's own "
            "settings, or start a new run from its weights with model.pretrained=<checkpoint>"
        )
