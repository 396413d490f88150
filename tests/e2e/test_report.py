"""Sweeps and the report: `train.py sweep=tiny` runs a 4-run multirun of the quickstart on the built-in data,
evaluate.py scores two runs, and `latentdiff.report` writes a table and plots that hold the runs' numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from latentdiff.flops import config_cost

from ..artefacts import make_inception_weights
from ..conftest import ROOT

SWEEP = [
    "sweep=tiny",
    "model.depth=2,4",  # the preset's axes, smaller: 4 runs of about 10 s on 2 cores
    "model.embed_dim=32,64",
    "model.num_heads=2",
    "data.num_train=128",
    "data.num_val=32",
    "data.batch_size=16",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=1",
    "trainer.precision=32-true",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=40",
    "callbacks.loss_curve=null",
    "sampler.steps=2",
]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop("LATENTDIFF_DEBUG", None)
    return env


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep")
    _run(str(ROOT / "train.py"), f"paths.log_dir={cwd}/outputs", "name=tiny", *SWEEP, cwd=cwd)
    (multirun,) = (cwd / "outputs" / "tiny").iterdir()
    return multirun


@pytest.mark.slow
def test_sweep_then_report_holds_every_runs_numbers(sweep, tmp_path):
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    # FID of two runs: sample, then evaluate against the samples of run 0 (tiny random-weight Inception)
    weights = make_inception_weights(tmp_path / "inception.pth")
    fids = {}
    for job in jobs[:2]:
        out = job / "eval"
        _run(
            str(ROOT / "sample.py"),
            f"ckpt={job}/last.ckpt",
            "num_samples=16",
            "batch_size=16",
            "sampler.steps=2",
            f"out={out}",
            "save_png=false",
            cwd=tmp_path,
        )
        proc = _run(
            str(ROOT / "evaluate.py"),
            f"samples={out}/samples.npz",
            f"reference={jobs[0]}/eval/samples.npz" if job != jobs[0] else f"reference={out}/samples.npz",
            "metrics=[fid]",
            f"inception_weights={weights}",
            "batch_size=16",
            cwd=tmp_path,
        )
        fids[job.name] = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]["fid"]

    proc = _run("-m", "latentdiff.report", f"dir={sweep}", cwd=tmp_path)
    report = sweep / "report"
    for name in (
        "report.md",
        "report.csv",
        "report.json",
        "loss_vs_gflops.png",
        "loss_vs_params.png",
        "fid_vs_gflops.png",
        "val_loss_curves.png",
    ):
        assert (report / name).is_file() and (report / name).stat().st_size > 100, name
    assert "| run | model.depth | model.embed_dim |" in proc.stdout
    with open(report / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert [(r["model.depth"], r["model.embed_dim"]) for r in rows] == [
        ("2", "32"),
        ("2", "64"),
        ("4", "32"),
        ("4", "64"),
    ]
    for row, job in zip(rows, jobs, strict=True):
        cfg = OmegaConf.load(job / "config.yaml")
        cost = config_cost(cfg)
        assert float(row["params (M)"]) == pytest.approx(cost.params / 1e6, abs=0.005)
        assert float(row["GFLOPs"]) == pytest.approx(cost.gmacs, rel=1e-2)
        with open(job / "metrics.csv") as f:
            metrics = list(csv.DictReader(f))
        last_val = [r["val/loss_ema"] for r in metrics if r.get("val/loss_ema")][-1]
        assert float(row["val loss (EMA)"]) == pytest.approx(float(last_val), abs=1e-4)
        assert row["step"] == "40" and float(row["img/s"]) > 0
        if job.name in fids:
            assert float(row["FID"]) == pytest.approx(fids[job.name], abs=0.01) and row["FID setup"].startswith(
                "FID-16"
            )
        else:
            assert row["FID"] == ""
    # a set against itself: 16 images give a rank-15 covariance of 2048 features, whose matrix square root is
    # exact to about 1e-3 (-0.0013 with the flow quickstart's samples); another set scores in the hundreds
    assert fids["0"] == pytest.approx(0.0, abs=5e-3)
    # bigger models cost more: the table's ordering is the configs'
    gflops = [float(r["GFLOPs"]) for r in rows]
    assert gflops[0] < gflops[1] and gflops[0] < gflops[2] < gflops[3]
    records = json.loads((report / "report.json").read_text())
    assert [r["swept"] for r in records][3] == {"model.depth": "4", "model.embed_dim": "64"}
