"""Data parallelism on CPU (gloo): DDP over 2 processes computes the 1-process gradient of the whole batch;
a 2-process run launched by `train.py trainer=ddp` trains, writes its run directory once and resumes exactly;
the global batch splits over ranks or fails in one line; the Hydra child command of ranks > 0."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..conftest import ROOT
from ..faults import weights

WORKER = ROOT / "tests" / "ddp_worker.py"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LATENTDIFF_DEBUG", None)
    return env


def _worker(out: Path, processes: int) -> dict:
    if processes == 1:
        argv = [sys.executable, str(WORKER), str(out)]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        argv += ["--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
        argv += [str(WORKER), str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_ddp_gradient_over_2_processes_equals_the_1_process_gradient_of_the_whole_batch(tmp_path):
    one = _worker(tmp_path / "one.pt", 1)
    two = _worker(tmp_path / "two.pt", 2)
    assert two["world"] == 2 and one["world"] == 1
    # the 2 ranks together saw exactly the 1-process batch (the global batch split, not duplicated)
    assert sorted(two["seen"].tolist()) == sorted(one["seen"].tolist()) and len(one["seen"]) == 8
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    worst = 0.0
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, float((two["grads"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12)))
    print(f"DDP(2) vs 1 process: {len(one['grads'])} gradient tensors, worst relative max difference {worst:.2e}")


# -------------------------------------------------------------------------------- train.py trainer=ddp
RUN = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "model=uvit_tiny",
    "model.embed_dim=32",
    "model.num_heads=2",
    "data.num_train=80",
    "data.num_val=16",
    "data.batch_size=16",  # global: 8 per rank, 5 steps per epoch
    "optim.warmup_steps=20",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "sampler.steps=2",
    "callbacks.sample_grid.every_n_steps=4",
    "callbacks.sample_grid.samples_per_class=1",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.checkpoint.keep_last=-1",
]


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={cwd}/outputs", *RUN, *args]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_run_writes_its_directory_once_and_resumes_where_the_uninterrupted_run_ends(tmp_path):
    reference = _train(tmp_path, "name=ref", "trainer.max_steps=12")
    assert reference.returncode == 0, reference.stderr[-4000:]
    (ref,) = (tmp_path / "outputs" / "ref").iterdir()  # one run directory, no per-rank Hydra directories
    assert sorted(p.name for p in ref.glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000004.ckpt",
        "step_0000008.ckpt",
        "step_0000012.ckpt",
    ]
    assert sorted(p.name for p in (ref / "samples").iterdir()) == [f"step_{s:07d}.png" for s in (4, 8, 12)]
    assert sorted(p.name for p in (ref / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    with open(ref / "metrics.csv") as f:
        logged = [r["step"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(logged) == 12 == len(set(logged))  # one row per step: rank 0 alone writes the CSV
    ckpt = torch.load(ref / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["world_size"] == 2 and state["batch_size"] == 8  # the per-rank share of the global 16

    first = _train(tmp_path, "name=run", "trainer.max_steps=6")  # 6 = mid-epoch 2, after the step-4 checkpoint
    assert first.returncode == 0, first.stderr[-4000:]
    (run,) = (tmp_path / "outputs" / "run").iterdir()
    second = _train(tmp_path, "name=run", "resume=auto", "trainer.max_steps=12")
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.name for p in (tmp_path / "outputs" / "run").iterdir()] == [run.name]
    assert "(step 6)" in (run / "train.log").read_text()
    ours, theirs = weights(run / "last.ckpt"), weights(ref / "last.ckpt")
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ after the 2-process resume, e.g. {differ[:3]}"

    other = _train(tmp_path, "name=run", "resume=auto", "trainer.devices=1", "trainer.max_steps=14")
    assert other.returncode == 2 and "resume on the same number of devices" in other.stderr


@pytest.mark.slow
def test_multirun_of_ddp_runs_gives_one_directory_per_job(tmp_path):
    """`-m` with DDP: each job's ranks > 0 re-run that job (not the sweep) into the job's directory."""
    sweep = [
        "hydra.mode=MULTIRUN",
        "name=sweep",
        "model.depth=2,4",
        "trainer.max_steps=2",
        "callbacks.sample_grid.every_n_steps=0",
    ]
    proc = _train(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (multirun,) = (tmp_path / "outputs" / "sweep").iterdir()  # no second sweep started by a rank > 0
    jobs = sorted(p.name for p in multirun.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, depth in zip(jobs, (2, 4), strict=True):
        ckpt = torch.load(multirun / job / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2 and ckpt["latentdiff"]["config"]["model"]["depth"] == depth
        (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert state["world_size"] == 2
