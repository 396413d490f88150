"""Loggers: metrics.csv written atomically and kept across resumes; wandb online or offline, resumable."""

from __future__ import annotations

import contextlib
import csv
import errno
import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from latentdiff.errors import DiskFullError, disk_full_message
from latentdiff.lightning_internals import csv_writer

if TYPE_CHECKING:
    import lightning as L


class _RunCSVWriter(ExperimentWriter):
    """`metrics.csv` rewritten whole into a temporary file and renamed at every save (a crash never leaves a
    half-written file). A resumed run keeps the rows logged before its checkpoint's step and drops the later
    ones (they are logged again), so the file reads as if the run had never stopped."""

    def __init__(self, log_dir: str, keep_before_step: int | None = None) -> None:
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if keep_before_step is not None and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) < keep_before_step]

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        """Lightning's record, merged into the row of its step: the learning rate (logged before the step's batch)
        and the losses, throughput and previews of one step share one row."""
        pending = len(self.metrics)
        super().log_metrics(metrics_dict, step)
        if len(self.metrics) != pending + 1 or not (self.metrics[:-1] or self.rows):
            return
        new = self.metrics.pop()
        recent = self.metrics[::-1] + self.rows[:-9:-1]  # the rows a record of a recent step can belong to
        row = next((r for r in recent if str(r.get("step")) == str(new["step"])), None)
        if row is None:
            self.metrics.append(new)
            return
        row.update({k: v for k, v in new.items() if v is not None})
        if not any(r is row for r in self.metrics):  # the row was saved already: the next save rewrites the file
            self.rows.remove(row)
            self.metrics.append(row)
            self.metrics.sort(key=lambda r: float(r.get("step") or 0))

    def save(self) -> None:
        if not self.metrics:
            return
        self.metrics_keys = sorted(set(self.metrics_keys).union(*self.metrics))  # as Lightning's writer orders them
        self.rows.extend(self.metrics)
        self.metrics = []
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, self.metrics_file_path)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            kept = "metrics.csv was left as it was"
            raise DiskFullError(errno.ENOSPC, disk_full_message(err, self.metrics_file_path, kept=kept)) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class RunCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` writing `<save_dir>/metrics.csv` atomically; `resume_step` (set by the training
    entry when it resumes) keeps the history logged before that step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> _RunCSVWriter:
        return csv_writer(self, lambda: _RunCSVWriter(self.log_dir, keep_before_step=self.resume_step))


WANDB_MODES = ("online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(mode: str | None = None, id: str | None = None, **kwargs: Any) -> WandbLogger:
    """A `WandbLogger` that never prompts: online only when logged in, or when `mode` says so.

    Args:
        mode: "online", "offline", "disabled", or None to choose (WANDB_MODE if set, else online when
            logged in, else offline; sync offline runs later with `wandb sync <run dir>/wandb/offline-run-*`).
        id: the wandb run id to continue (a resumed training run passes its checkpoint's).
        **kwargs: passed to `WandbLogger` (project, name, save_dir, tags, ...).
    """
    if id is not None:
        kwargs.update(id=str(id), resume="allow")
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not supported; use one of {', '.join(WANDB_MODES)}")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(mode=mode, **kwargs)


def wandb_run_id(trainer: L.Trainer | None) -> str | None:
    """The run id of the trainer's wandb logger (kept in checkpoints, so a resumed run continues it); None
    without a trainer or a wandb logger."""
    loggers = trainer.loggers if trainer is not None else []
    return next((str(lg.version) for lg in loggers if isinstance(lg, WandbLogger)), None)
