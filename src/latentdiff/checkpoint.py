"""Checkpoints: atomic writes, safe reads, finding the one to resume from, and refusing the wrong one.

- `AtomicCheckpointIO` (Lightning's checkpoint plugin of every run): a checkpoint is written to a temporary
  file in the same folder, flushed to disk and renamed over its name, so a crash mid-write leaves the
  previous file intact and never a file that looks complete. Reads use `weights_only=True`.
- `load_checkpoint`: one-line errors for a missing, truncated or foreign file.
- `latest_checkpoint(run_dir)`: the checkpoint of a run directory with the highest optimizer step
  (`last.ckpt`, `step_*.ckpt`, Lightning's SLURM `hpc_ckpt_*.ckpt`).
- `check_resumable(stored, cfg)`: resuming another backbone or data shape is an error naming the key.
- `run_dir(base, resume)`: the run directory (the `ld.run_dir` resolver of `conf/hydra/default.yaml`).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from latentdiff.config import ConfigError

CHECKPOINT_PATTERNS = ("last.ckpt", "step_*.ckpt", "hpc_ckpt_*.ckpt", "preempted.ckpt")

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


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """`torch.save` into `.<name>.tmp-<pid>` next to `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for fsync (some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_torch_file(path: str | Path, key: str = "ckpt_path", mmap: bool = False, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with a one-line error for a missing, truncated or foreign file.

    Raises:
        ConfigError: naming `key` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap can only be used" in str(err)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # a legacy (non-zip) file
    except Exception as err:  # truncated zip, foreign pickle, objects weights_only refuses
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0].rstrip(".")[:160]  # torch's zip errors go on about miniz internals
        raise ConfigError(
            f"{key}={path} is not a readable checkpoint (truncated, corrupt or not a torch file: {first})"
        ) from None


def load_checkpoint(path: str | Path, key: str = "ckpt_path", mmap: bool = False) -> dict[str, Any]:
    """A latentdiff training checkpoint, read with `weights_only=True`.

    Args:
        path: the file.
        key: the config key that named it (for the error message).
        mmap: memory-map the tensors (cheap reads of the step and config of a large file).

    Raises:
        ConfigError: missing, unreadable (truncated, corrupt, not a checkpoint), or not written by latentdiff.
    """
    ckpt = read_torch_file(path, key, mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "latentdiff" not in ckpt:
        raise ConfigError(
            f"{key}={path} is not a latentdiff training checkpoint (no run config inside); "
            "for a plain weights file use model=<preset> model.pretrained=<file>"
        )
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with atomic writes and `weights_only` reads with one-line errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        # any file Lightning reads through the plugin (ddp_spawn also passes plain weights this way)
        return read_torch_file(path, map_location=map_location or "cpu")


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (-1 when it cannot be read)."""
    try:
        return int(load_checkpoint(path, mmap=True).get("global_step", -1))
    except ConfigError:
        return -1


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run directory (not the FID-best one, which is not the run's latest state)."""
    run_dir = Path(run_dir)
    return sorted({p for pattern in CHECKPOINT_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The readable checkpoint of `run_dir` with the highest step (ties: the newest file); None if none."""
    steps = [(checkpoint_step(p), p.stat().st_mtime, p) for p in checkpoints(run_dir)]
    steps = [s for s in steps if s[0] >= 0]
    return max(steps)[2] if steps else None


def run_dir(base: str, resume: Any) -> str:
    """The run directory for `hydra.run.dir`.

    Args:
        base: `<log_dir>/<name>`.
        resume: null (a new `<base>/<date>_<time>`), "auto" (the newest run under `base` holding a checkpoint,
            else a new one), or a run directory.
    """
    if no_resume(resume):
        return _new_run_dir(base)
    if str(resume) == "auto":
        runs = [p for p in Path(base).glob("*") if p.is_dir() and latest_checkpoint(p) is not None]
        if runs:
            return str(max(runs, key=lambda p: (max(c.stat().st_mtime for c in checkpoints(p)), p.name)))
        return _new_run_dir(base)
    return str(Path(resume).expanduser().resolve())


# run directories this process chose as new ones: only those may be removed after an error
NEW_RUN_DIRS: set[str] = set()


def _new_run_dir(base: str) -> str:
    path = f"{base}/{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    if not Path(path).exists():
        NEW_RUN_DIRS.add(os.path.abspath(path))
    return path


def no_resume(resume: Any) -> bool:
    """Whether a `resume` value means "start a new run" (null, false, empty)."""
    return resume is None or resume is False or str(resume) in ("", "null", "None", "false", "False")


def hydra_subdir(run: str) -> str:
    """Hydra's record folder in a run directory: `.hydra` in a new one, `.hydra/resume_<time>` in one that
    already holds a run or a record (the first launch's record is never overwritten)."""
    run_dir = Path(run)
    markers = (".hydra", "config.yaml", "metrics.csv", "last.ckpt")  # not train.log: Hydra opens it first
    if any((run_dir / m).exists() for m in markers) or any(run_dir.glob("*.ckpt")):
        return f".hydra/resume_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    return ".hydra"


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
