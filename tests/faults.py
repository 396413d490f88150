"""Faults injected into real training runs by the reliability tests, as Hydra-instantiated callbacks:

    python train.py ... +callbacks.fault._target_=tests.faults.Kill +callbacks.fault.step=7 +callbacks.fault.at=mid

(the subprocess runs with the repository on PYTHONPATH).
"""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class Kill(L.Callback):
    """Send `sig` to this process at optimizer step `step`.

    at: "mid" -- inside the step, after the forward/backward and before the optimizer update of step `step`;
        "start" -- before step `step` begins (right after step - 1 ended and its checkpoint was written).
    """

    def __init__(self, step: int, at: str = "mid", sig: str = "SIGKILL"):
        self.step, self.at, self.sig = int(step), at, getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at == "start" and trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.at == "mid" and trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


class PoisonSteps(L.Callback):
    """Make the batches of the given optimizer steps (1-based) NaN, so their loss and gradients are NaN."""

    def __init__(self, steps: list[int]):
        self.steps = {int(s) for s in steps}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps:
            for key in ("image", "moments"):
                if key in batch:
                    batch[key].fill_(float("nan"))


def weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that a resume must reproduce: weights, EMA, optimizer state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"state_dict.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, state in opt["state"].items():
            for name, value in state.items():
                out[f"optimizer{i}.{pid}.{name}"] = torch.as_tensor(value)
    return out
