"""The command line as a user meets it: one-line errors, exit status, nothing left behind, --cfg job.

The whole bad-input matrix runs in-process (tests/integration/test_bad_input.py, through the same `hydra_entry`
the scripts call); here a few cases run as real subprocesses of the scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT
from ..helpers.cli import run_python


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(tmp_path, [str(ROOT / "train.py"), f"paths.log_dir={tmp_path}/outputs", *args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["model=uvit_tiny", "model.patch_size=3"],
            "error: model.patch_size=3 does not divide the input size 32; use one of 1, 2, 4, 8, 16, 32",
        ),
        (
            ["model=uvit_xxl"],
            "error: model=uvit_xxl is not a known option of 'model'; use one of: uvit_l4, uvit_l2, uvit_s4, uvit_s2",
        ),
        (["optim.lr=-1e-4"], "error: optim.lr=-0.0001 must be > 0"),
        (["module.p_uncond=1.5"], "error: module.p_uncond=1.5 is outside [0, 1)"),
        (["model=uvit_tiny", "model.skip=sideways"], "error: model.skip='sideways' is not allowed; use one of"),
    ],
)
def test_bad_input_is_one_line_nonzero_exit_and_no_run_dir(tmp_path, args, message):
    proc = _train(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    leftovers = list((tmp_path / "outputs").rglob("*")) if (tmp_path / "outputs").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers  # no half-written run directory


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = _train(tmp_path, "model=uvit_s2", "optim.lr=1e-4", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "embed_dim: 512" in proc.stdout and "lr: 0.0001" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def _extract(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(tmp_path, ["-m", "latentdiff.extract", *args], HF_HUB_OFFLINE="1")


def test_extraction_bad_input_is_one_line(tmp_path):
    """One case in a subprocess (exit status, stderr, nothing written); the rest of the extraction mistakes are
    in the in-process matrix (tests/integration/test_bad_input.py)."""
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(b"")  # a folder with one (unreadable) image
    proc = _extract(tmp_path, f"data.root={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out=??? is missing"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls"]  # nothing written, no Hydra folders
