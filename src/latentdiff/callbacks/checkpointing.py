"""The run's checkpoints: periodic and timed (`Checkpoint`), and on a stop signal (`Preemption`).

Both write through the trainer's checkpoint IO (the run's `AtomicCheckpointIO`: temporary file, then rename), at
the end of an optimizer step, so every checkpoint holds the same loop state and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from latentdiff.lightning_internals import accumulating, checkpoint_state, last_batch_of_epoch

log = logging.getLogger(__name__)


def final_step(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is the last one of the fit (max_steps or the last epoch's end)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch and last_batch_of_epoch(trainer))


class Checkpoint(L.Callback):
    """The run's checkpoints, written atomically (the run's `AtomicCheckpointIO`).

    - every `every_n_train_steps` optimizer steps: `step_<step>.ckpt`, of which the last `keep_last` are kept,
      and `last.ckpt` (a hard link to the same file where the file system allows, else a second write);
    - every `every_n_minutes` of training in between, and when training ends: `last.ckpt`.

    `last.ckpt` is always the latest saved state; `resume=auto` picks the highest step among all of them.
    The ranges of the arguments are checked with the run config (`latentdiff.rules`, `callbacks.checkpoint.*`).

    Args:
        dirpath: the run directory.
        every_n_train_steps: period of the step checkpoints (0: none).
        keep_last: step checkpoints kept (-1: all, 0: none, only last.ckpt).
        every_n_minutes: period of the timed `last.ckpt` refresh (null or 0: off).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 5000,
        keep_last: int = 3,
        every_n_minutes: float | None = 30.0,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_train_steps, self.keep_last = int(every_n_train_steps), int(keep_last)
        self.every_n_seconds = float(every_n_minutes) * 60 if every_n_minutes else None
        self.last_saved_step = -1
        self._last_time = time.monotonic()

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def step_path(self, step: int) -> Path:
        return self.dirpath / f"step_{step:07d}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._last_time = time.monotonic()
        self.last_saved_step = trainer.global_step  # a resumed run does not rewrite the checkpoint it came from

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_saved_step or accumulating(trainer):
            return
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            self.save(trainer, with_step=True)
            return
        if final_step(trainer):  # saved here, in the same loop state as every other checkpoint
            self.save(trainer, with_step=False)
            return
        if self.every_n_seconds is None:
            return
        due = time.monotonic() - self._last_time >= self.every_n_seconds
        if trainer.strategy.broadcast(due):  # rank 0 decides, so every rank saves together
            self.save(trainer, with_step=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step:  # stopped early (should_stop): keep the state
            self.save(trainer, with_step=False)

    def save(self, trainer: L.Trainer, with_step: bool) -> None:
        """Write `step_<step>.ckpt` (with_step) and `last.ckpt`; prune old step checkpoints (rank 0)."""
        step = trainer.global_step
        if with_step and self.keep_last != 0:
            path = self.step_path(step)
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                self._link_last(path, trainer)
                self._prune()
        else:
            trainer.save_checkpoint(self.last, weights_only=False)
        trainer.strategy.barrier("latentdiff.checkpoint")
        self.last_saved_step, self._last_time = step, time.monotonic()

    def _link_last(self, path: Path, trainer: L.Trainer) -> None:
        tmp = self.dirpath / f".last.ckpt.link-{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # no hard links here: write it again (atomically)
            tmp.unlink(missing_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint_state(trainer), self.last)

    def _prune(self) -> None:
        if self.keep_last < 0:
            return
        pattern = re.compile(r"step_(\d+)\.ckpt$")
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step_*.ckpt") if (m := pattern.search(p.name)))
        for _, path in steps[: max(len(steps) - self.keep_last, 0)]:
            path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_saved_step = int(state.get("last_saved_step", -1))


class Preemption(L.Callback):
    """SIGTERM and SIGUSR1 stop the run with a checkpoint at the next optimizer-step boundary; exit 0.

    The signal handlers only set a flag. At the end of each optimizer step (never inside a gradient-
    accumulation cycle) the ranks agree on it (any rank signalled: all stop), `last.ckpt` is written in the
    same loop state as the periodic checkpoints (through `callbacks.checkpoint` when it is there), and the
    trainer stops cleanly. `python train.py ... resume=auto` (or `resume=<run dir>`) continues exactly.
    A signal that arrives before training starts, or a stop Lightning raises itself, still saves the state
    in `on_exception`. Under SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's (it saves
    `hpc_ckpt_*.ckpt` and requeues the job). A handler that was there before (submitit's SIGUSR2 / SIGTERM:
    requeue the job, `hydra/launcher=slurm`) is called once the checkpoint is written and training has
    stopped, so the requeued job resumes from this step (with `resume=auto`).

    Args:
        dirpath: the run directory.
        filename: the checkpoint written on a stop (`last.ckpt`: the run's latest state).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self._previous: dict[int, Any] = {}
        self.requested = False
        self._signal: int | None = None
        self._saved_step = -1

    def _request(self, signum, frame) -> None:
        log.info("received signal %d: stopping at the end of this optimizer step with a checkpoint", signum)
        self.requested = True
        self._signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):  # not claimed by SLURM auto-requeue
            signals.append(signal.SIGUSR1)
        if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's timeout/preemption signal: requeue after us
            signals.append(signal.SIGUSR2)
        for signum in signals:
            with contextlib.suppress(ValueError):  # not the main thread: keep Lightning's handling
                self._previous[signum] = signal.signal(signum, self._request)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if accumulating(trainer):
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.save(trainer)
        trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, Checkpoint)), None)
        if checkpoint is not None and checkpoint.last == self.path:
            if checkpoint.last_saved_step != trainer.global_step:
                checkpoint.save(trainer, with_step=False)
        else:
            trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step
        log.info("stopped by a signal at step %d; checkpoint %s", trainer.global_step, self.path)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        chained = previous.get(self._signal) if self._signal is not None else None
        if callable(chained) and self._saved_step >= 0:
            log.info(
                "passing signal %d on to the handler that was installed before (e.g. submitit's requeue)", self._signal
            )
            chained(self._signal, None)
