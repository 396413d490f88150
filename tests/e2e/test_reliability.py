"""Reliability: a run killed anywhere and resumed ends bit-for-bit where the uninterrupted run ends; SIGTERM /
SIGUSR1 checkpoint and exit 0; NaN steps are skipped or stop the run; checkpoints are atomic and checked."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from latentdiff.errors import ConfigError
from latentdiff.rundir import latest_checkpoint

from ..conftest import ROOT
from ..faults import weights

# 5 batches per epoch, a checkpoint every 4 steps, validation every 6, LR warm-up over the whole run, EMA,
# label dropout: every piece of state a resume has to restore moves at every step.
RUN = [
    "model=uvit_tiny",
    "model.embed_dim=32",
    "model.num_heads=2",
    "trainer.precision=32-true",
    "data.num_train=80",
    "data.num_val=16",
    "data.batch_size=16",
    "trainer.max_steps=22",
    "optim.warmup_steps=30",
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid=null",
    "callbacks.loss_curve=null",
    "callbacks.progress_bar=null",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.checkpoint.keep_last=-1",
]


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop("LATENTDIFF_DEBUG", None)
    argv = [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={cwd}/outputs", *RUN, *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> dict[str, str]:
    with open(run / "metrics.csv") as f:
        return {r["step"]: r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = _train(cwd, "name=ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (cwd / "outputs" / "ref").iterdir()
    return run


def _assert_same_end(run: Path, reference: Path) -> None:
    ours, theirs = weights(run / "last.ckpt"), weights(reference / "last.ckpt")
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 22
    assert _losses(run) == _losses(reference)  # every logged step, once, with the same value


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "at", "sig", "resumes_from"),
    [
        (7, "mid", "SIGKILL", 4),  # inside a step, mid-epoch (epoch 1, batch 2), 3 steps after a checkpoint
        (9, "start", "SIGKILL", 8),  # right after the checkpoint of step 8 was written
        (21, "start", "SIGKILL", 20),  # right after a checkpoint at the end of an epoch (step 20 = 4 x 5)
        (13, "mid", "SIGTERM", 13),  # preemption: checkpoint after the current step, exit 0
        (15, "mid", "SIGTERM", 15),  # preemption on the last batch of an epoch
        (17, "mid", "SIGUSR1", 17),
    ],
    ids=[
        "kill-mid-epoch",
        "kill-after-checkpoint",
        "kill-after-epoch-end-checkpoint",
        "sigterm",
        "sigterm-epoch-end",
        "sigusr1",
    ],
)
def test_killed_and_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, reference, step, at, sig, resumes_from):
    fault = ["+callbacks.fault._target_=tests.faults.Kill", f"+callbacks.fault.step={step}"]
    fault += [f"+callbacks.fault.at={at}", f"+callbacks.fault.sig={sig}"]
    first = _train(tmp_path, "name=run", "resume=auto", *fault)
    if sig == "SIGKILL":
        assert first.returncode == -signal.SIGKILL
    else:
        assert first.returncode == 0, first.stderr[-3000:]  # a clean stop
    (run,) = (tmp_path / "outputs" / "run").iterdir()
    assert torch.load(latest_checkpoint(run), weights_only=True)["global_step"] == resumes_from
    assert (run / ".hydra" / "overrides.yaml").is_file()  # the first launch's record

    second = _train(tmp_path, "name=run", "resume=auto")  # the same command again, as a requeued job runs it
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "run").iterdir()] == [run.name]  # the same run directory
    assert f"(step {resumes_from})" in (run / "train.log").read_text()
    assert len(list((run / ".hydra").glob("resume_*/overrides.yaml"))) == 1  # the resume's, beside it
    _assert_same_end(run, reference)


@pytest.mark.slow
def test_ckpt_path_continues_a_checkpoint_into_a_new_run_directory(tmp_path, reference):
    """ckpt_path=<step_8> continues into a new run directory and ends where the reference ends."""
    new = _train(tmp_path, "name=cont", f"ckpt_path={reference / 'step_0000008.ckpt'}")
    assert new.returncode == 0, new.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "cont").iterdir()
    ours, theirs = weights(run / "last.ckpt"), weights(reference / "last.ckpt")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(tmp_path):
    poison = ["+callbacks.fault._target_=tests.faults.PoisonSteps", "+callbacks.fault.steps=[3,5,6,7]"]
    args = ["name=nan", "trainer.max_steps=10", "callbacks.checkpoint.every_n_train_steps=1", *poison]
    proc = _train(tmp_path, *args, "module.nonfinite.max_skips=2")
    assert proc.returncode == 3
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: non-finite loss at step 7 (epoch 1, dataset indices [")
    assert "training stopped after 2 consecutive skipped steps" in lines[-1]
    assert "Traceback" not in proc.stderr
    (run,) = (tmp_path / "outputs" / "nan").iterdir()
    log = (run / "train.log").read_text()
    assert "non-finite loss at step 3" in log and "update skipped (1 of 2" in log
    step = {n: weights(run / f"step_{n:07d}.ckpt") for n in (2, 3, 4, 6)}
    # step 3 was skipped: weights, EMA and optimizer state are those after step 2; step 4 trained again
    assert all(torch.equal(step[2][k], step[3][k]) for k in step[2])
    assert not all(torch.equal(step[3][k], step[4][k]) for k in step[3])
    assert all(torch.equal(v, step[6][k]) for k, v in weights(run / "last.ckpt").items())
    assert not (run / "step_0000007.ckpt").exists()
    assert all(torch.isfinite(v.float()).all() for v in step[6].values())


@pytest.mark.parametrize(
    ("model", "folder", "flow"),
    [("uvit_tiny", "transformer", False), ("unet_tiny", "unet", False), ("uvit_tiny", "transformer", True)],
    ids=["uvit", "unet", "uvit-flow (the quickstart's objective)"],
)
def test_export_round_trip_gives_identical_outputs(compose_cfg, tmp_path, model, folder, flow):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from latentdiff.export import export, load_exported
    from latentdiff.models.build import build_backbone
    from latentdiff.train import run_training

    from ..conftest import TINY_RUN

    objective = ["diffusion=flow_logit_normal", "sampler=flow_euler"] if flow else []
    cfg = compose_cfg([*TINY_RUN, f"model={model}", *objective])
    run = Path(run_training(cfg)["run_dir"])
    record = export(run / "last.ckpt", tmp_path / "export")
    out = tmp_path / "export"
    assert record["weights"] == "ema" and record["step"] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["backbone.safetensors", folder, "latentdiff.json", "model_index.json", "pipeline_latentdiff.py", "scheduler"]
    )
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    ema = {k[len("ema.model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.tensor([1, 4])
    reference = build_backbone(cfg.model).eval()
    reference.load_state_dict(ema)
    with torch.no_grad():
        expected = reference(x, t, y)
        for source in (out, out / "backbone.safetensors"):
            assert torch.equal(load_exported(source)(x, t, y), expected), source
            again = OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "pretrained": str(source)})
            assert torch.equal(build_backbone(again).eval()(x, t, y), expected), source
    if flow:  # the flow run's training scheduler, as diffusers reads it
        assert FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler").config.shift == 1.0
    else:
        assert (
            DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type
            == cfg.diffusion.scheduler.prediction_type
        )
    if folder == "unet":
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(out, subfolder="unet")  # a plain diffusers folder
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.unet.state_dict().values()))
    _pipeline_draws_what_sample_py_draws(run, out, tmp_path)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export(run / "last.ckpt", out)


def _pipeline_draws_what_sample_py_draws(run: Path, out: Path, tmp_path: Path) -> None:
    """`DiffusionPipeline.from_pretrained(export, trust_remote_code=True)` gives sample.py's images, pixel for pixel."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from latentdiff.sample import run_sampling

    from ..conftest import compose_entry

    args = [f"ckpt={run / 'last.ckpt'}", "num_samples=4", "labels=balanced", f"out={tmp_path / 'samples'}"]
    run_sampling(compose_entry("sample", args), args)
    npz = np.load(tmp_path / "samples" / "samples.npz")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(out)  # the folder's code runs only when the user says so
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "LatentdiffPipeline"
    images = pipe(class_labels=npz["arr_1"].tolist(), seed=0, output_type="np").images
    assert images.dtype == np.uint8 and np.array_equal(images, npz["arr_0"])
    pil = pipe(class_labels=[int(npz["arr_1"][1])], seed=0).images  # index 0 of another batch: another image
    assert pil[0].size == (32, 32) and np.array_equal(np.asarray(pil[0]), npz["arr_0"][0]) is False
