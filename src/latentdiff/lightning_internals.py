"""Every use of Lightning's private API, one function each, with why the public API does not do it.

Written against Lightning 2.6; a Lightning upgrade that breaks the project breaks it here. Callers (the module,
the callbacks, the loggers, the DDP launch) call these functions and touch no private name of Lightning.
This module imports nothing of the package, and Lightning only inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # importing Lightning costs seconds: the DDP launch hook is installed before it is needed
    import lightning as L
    import torch

W = TypeVar("W")


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write at the current training step (`trainer.log_every_n_steps`).

    Lightning decides this from its loop's count of batches that stepped, also when the run stops early; no public
    property says it, and recomputing the rule from `global_step` differs under gradient accumulation.
    """
    return bool(trainer._logger_connector.should_update_logs)


def accumulating(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is inside a gradient-accumulation cycle (no optimizer step after it).

    The fit loop knows (it also steps on an epoch's last batch, whatever `accumulate_grad_batches` says); no public
    attribute tells a callback.
    """
    return bool(trainer.fit_loop._should_accumulate())


def last_batch_of_epoch(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is the last of its epoch.

    The loop's progress tracker is its internal state (not a documented API); `num_training_batches` does not
    account for an iterable dataset's end.
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def batches_processed(trainer: L.Trainer) -> int:
    """Batches of the current epoch the trainer has processed (what a resumed epoch skips).

    The loop's progress tracker is its internal state; Lightning restores it from a checkpoint but exposes no count.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def checkpoint_state(trainer: L.Trainer) -> dict[str, Any]:
    """The full checkpoint dict of the trainer's current state, without writing it and without a collective.

    `trainer.save_checkpoint` writes and then waits on a barrier, so it cannot run on rank 0 alone; the checkpoint
    connector's `dump_checkpoint` is the step before the write.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def set_callback_metric(trainer: L.Trainer, name: str, value: torch.Tensor) -> None:
    """Make `value` visible to monitors and the run's summary as `trainer.callback_metrics[name]`, now.

    `LightningModule.log` from a callback keeps repeating the value until the epoch ends; the public property
    returns the logger connector's own dict, and writing into it is the one way to set a metric once.
    """
    trainer._logger_connector.callback_metrics[name] = value


def peak_flops(trainer: L.Trainer) -> float | None:
    """The device's peak FLOP/s for the run's precision from Lightning's GPU table; None off CUDA or unknown.

    The compute dtype of a precision plugin is only available through the helper of Lightning's
    `ThroughputMonitor`, a private function.
    """
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    return get_available_flops(device, _plugin_to_compute_dtype(trainer.precision_plugin))


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's trainer, or None when it is not attached to one (`module.trainer` raises then)."""
    return module._trainer


def csv_writer(logger: Any, make: Callable[[], W]) -> W:
    """The `CSVLogger`'s experiment writer, made by `make` at the first call.

    `CSVLogger` offers no public way to choose its writer class; it keeps the writer in `_experiment`, which its
    own `save` and `finalize` read, so the writer must be stored there.
    """
    if logger._experiment is None:
        logger._experiment = make()
    return logger._experiment


def replace_hydra_subprocess_command(command: Callable[[int], tuple[list[str], str]]) -> None:
    """Make Lightning's DDP launchers (fabric's and the trainer's) start local ranks > 0 with `command`.

    Under Hydra the launchers build the child command with the module function `_hydra_subprocess_cmd`; Lightning
    has no option to supply another.
    """
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):
        if not hasattr(module, "_hydra_subprocess_cmd"):
            raise RuntimeError(
                f"{module.__name__} has no _hydra_subprocess_cmd in this Lightning version; latentdiff's DDP launch "
                "under Hydra (latentdiff.lightning_internals.replace_hydra_subprocess_command) needs updating for it"
            )
        module._hydra_subprocess_cmd = command
