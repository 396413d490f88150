"""Reliability: a run killed anywhere and resumed ends bit-for-bit where the uninterrupted run ends; SIGTERM /
SIGUSR1 checkpoint and exit 0; NaN steps are skipped or stop the run; checkpoints are atomic and checked."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from latentdiff.checkpoint import load_checkpoint


def test_checkpoints_keep_the_last_k_and_last_is_the_latest(compose_cfg):
    from latentdiff.train import run_training

    from ..conftest import TINY_RUN

    overrides = ["callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.keep_last=2"]
    run = Path(run_training(compose_cfg([*TINY_RUN, "trainer.max_steps=7", *overrides]))["run_dir"])
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]
    assert load_checkpoint(run / "last.ckpt")["global_step"] == 7  # saved again when training ended
    assert not list(run.glob(".*tmp*"))  # no temporary files left behind


def test_timed_checkpoints_refresh_last_ckpt(compose_cfg, monkeypatch):
    from latentdiff.callbacks import Checkpoint
    from latentdiff.train import run_training

    from ..conftest import TINY_RUN

    saves: list[tuple[int, bool]] = []
    original = Checkpoint.save

    def counting(self, trainer, with_step):
        saves.append((trainer.global_step, with_step))
        original(self, trainer, with_step)

    monkeypatch.setattr(Checkpoint, "save", counting)
    timed = ["callbacks.checkpoint.every_n_train_steps=0", "callbacks.checkpoint.every_n_minutes=1e-9"]
    run = Path(run_training(compose_cfg([*TINY_RUN, *timed]))["run_dir"])
    assert saves == [(1, False), (2, False), (3, False)]  # every step is "30 minutes later" here
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt"]
    assert load_checkpoint(run / "last.ckpt")["global_step"] == 3


def test_sigusr2_checkpoints_then_hands_the_signal_to_the_requeue_handler(compose_cfg):
    """submitit (hydra/launcher=slurm) requeues on SIGUSR2: latentdiff checkpoints at the step boundary first,
    then calls the handler that was there before, once, after training stopped."""
    from hydra.utils import instantiate

    from latentdiff.train import run_training
    from tests.faults import Kill

    calls = []

    def requeue(signum, frame):  # stands for submitit's checkpoint-and-requeue handler
        ckpt = torch.load(Path(cfg.paths.output_dir) / "last.ckpt", weights_only=True)
        calls.append((signum, ckpt["global_step"]))

    cfg = compose_cfg(
        [
            "trainer.max_steps=8",
            "trainer.precision=32-true",
            "data.batch_size=16",
            "data.num_train=64",
            "callbacks.sample_grid=null",
            "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false",
            "+callbacks.fault._target_=tests.faults.Kill",
            "+callbacks.fault.step=3",
            "+callbacks.fault.at=mid",
            "+callbacks.fault.sig=SIGUSR2",
        ]
    )
    assert isinstance(instantiate(cfg.callbacks.fault), Kill)
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        result = run_training(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert result["global_step"] == 3  # stopped after the signalled step
    assert calls == [(signal.SIGUSR2, 3)]  # the requeue came after the checkpoint of that step
