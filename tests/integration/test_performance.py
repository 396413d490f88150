"""The fast training step: no host-device sync between log steps, the device-side skip of non-finite steps,
gradient clipping from the guard's norm, EMA on the device, regional compilation, channels_last UNets."""

from __future__ import annotations

import traceback
from collections import Counter

import lightning as L
import pytest
import torch

from latentdiff.train import run_training

from ..conftest import TINY_RUN

# Tensor methods that read a value back to the host: each one waits for the GPU (a sync) on a CUDA tensor
_READBACKS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


class _SyncSpy(L.Callback):
    """Counts host read-backs of tensors per optimizer step being computed (1-based), with where they came from."""

    def __init__(self):
        self.step = 0
        self.calls: dict[int, Counter] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step + 1

    def record(self, name: str) -> None:
        frame = next(
            (f for f in reversed(traceback.extract_stack()[:-2]) if "test_performance" not in f.filename), None
        )
        where = f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}" if frame else "?"
        self.calls.setdefault(self.step, Counter())[f"{name} at {where}"] += 1


@pytest.fixture
def spy(monkeypatch):
    spy = _SyncSpy()
    for name in _READBACKS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, __name=name, __original=original, **kwargs):
            if spy.step:
                spy.record(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return spy


def test_training_steps_read_nothing_back_from_the_device_between_log_steps(compose_cfg, spy, monkeypatch):
    """Between log steps the step (data, loss, backward, guard, clipping, AdamW, EMA) and the callbacks
    (throughput, loss curve, checkpoints, preemption, progress bar) never wait for the device."""
    overrides = [*TINY_RUN, "trainer.max_steps=12", "trainer.log_every_n_steps=5", "trainer.limit_val_batches=0"]
    overrides += ["trainer.enable_progress_bar=true", "callbacks.checkpoint.every_n_train_steps=100"]
    cfg = compose_cfg([o for o in overrides if o != "callbacks.progress_bar=null"])
    fit = L.Trainer.fit

    def fit_with_spy(trainer, *args, **kwargs):
        trainer.callbacks.append(spy)
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_with_spy)
    assert run_training(cfg)["global_step"] == 12
    quiet = {step: calls for step, calls in spy.calls.items() if step % 5 and step != 12}  # 12: the end
    assert not quiet, f"host read-backs in steps that log nothing: {quiet}"
    assert spy.calls.get(5) or spy.calls.get(10), "the spy saw no log step: it does not work"


@pytest.mark.slow
def test_training_with_blocks_compiled_matches_eager(tmp_path):
    """Per-block compilation trains the same model: the same losses as eager to float tolerance."""
    from ..conftest import compose_config

    eager = run_training(compose_config([*TINY_RUN, "trainer.max_steps=2"], tmp_path / "eager"))
    blocks = [*TINY_RUN, "trainer.max_steps=2", "+module.compile.scope=blocks"]
    compiled = run_training(compose_config(blocks, tmp_path / "blocks"))
    assert compiled["global_step"] == 2
    losses = [torch.tensor(run["metrics"]["train/loss"]) for run in (compiled, eager)]
    torch.testing.assert_close(*losses, rtol=1e-3, atol=1e-4)
