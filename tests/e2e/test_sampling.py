"""sample.py and the FID callback: per-index determinism, resume, sharding, objectives end to end, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentdiff.samplers.conditions import class_labels
from latentdiff.train import run_training

from ..conftest import ROOT, TINY_RUN
from ..helpers.cli import run_python


@pytest.fixture(scope="module")
def quick_ckpt(tmp_path_factory) -> Path:
    """A 3-step class-conditional U-ViT run on the shapes (4 classes) and its last.ckpt."""
    from ..conftest import compose_config

    root = tmp_path_factory.mktemp("ckpt")
    result = run_training(compose_config(TINY_RUN, root))
    return Path(result["run_dir"]) / "last.ckpt"


def _sample(tmp_path: Path, *args: str):
    return run_python(tmp_path, [str(ROOT / "sample.py"), *args])


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def test_sample_py_writes_adm_npz_pngs_provenance_and_resumes(quick_ckpt, tmp_path):
    out = tmp_path / "s"
    args = [f"ckpt={quick_ckpt}", "sampler.steps=3", f"out={out}", "guidance_scale=1.5"]
    first = _sample(tmp_path, *args, "num_samples=6", "batch_size=4")
    assert first.returncode == 0, first.stderr[-3000:]
    arrays = _npz(out / "samples.npz")
    assert set(arrays) == {"arr_0", "arr_1"}
    assert arrays["arr_0"].shape == (6, 32, 32, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].tolist() == class_labels(range(6), 4, seed=0).tolist()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    meta = json.loads((out / "samples.json").read_text())
    assert meta["complete"] and meta["weights"] == "ema" and meta["global_step"] == 3
    assert meta["sampler"]["steps"] == 3 and meta["sampler"]["guidance_scale"] == 1.5
    assert meta["sampler"]["scheduler"]["_target_"].startswith("diffusers.DPMSolverMultistepScheduler")

    # an interrupted run: the parts of indices >= 4 are gone; the re-run makes only those, and more
    for part in (out / "parts").glob("*.json"):
        if json.loads(part.read_text())["indices"][0] >= 4:
            part.unlink()
    again = _sample(tmp_path, *args, "num_samples=9", "batch_size=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 of 9 samples to make" in again.stdout + again.stderr
    extended = _npz(out / "samples.npz")
    assert extended["arr_0"].shape[0] == 9
    done = _sample(tmp_path, *args, "num_samples=9", "batch_size=2")
    assert done.returncode == 0 and "already holds the 9 samples asked for" in done.stdout + done.stderr
    assert (extended["arr_0"][:6].astype(int) - arrays["arr_0"].astype(int)).__abs__().max() <= 1

    # two processes share the indices; the images are those of one process
    two = _sample(tmp_path, *args, "num_samples=9", "batch_size=3", "devices=2", f"out={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    parted = _npz(tmp_path / "two" / "samples.npz")
    assert (parted["arr_0"].astype(int) - extended["arr_0"].astype(int)).__abs__().max() <= 1
    assert parted["arr_1"].tolist() == extended["arr_1"].tolist()
    assert {p.name[:4] for p in (tmp_path / "two" / "parts").glob("*.npy")} == {"r000", "r001"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["num_samples=0"], "num_samples=0 must be a positive integer"),
        (["use_ema=true", "precision=fp8"], "precision='fp8' is not supported; use one of fp32, bf16, fp16"),
    ],
)
def test_sample_py_bad_input_is_one_line(quick_ckpt, tmp_path, args, message):
    """As a subprocess of sample.py; the rest of sample.py's mistakes (a checkpoint that does not fit, labels
    past the classes, a folder of other samples, ...) are in the in-process matrix (integration/test_bad_input.py)."""
    result = _sample(tmp_path, f"ckpt={quick_ckpt}", "num_samples=2", "sampler.steps=2", f"out={tmp_path}/s", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0] == "error: " + lines[0][7:] and message.format(ckpt=quick_ckpt) in lines[0]
    assert not (tmp_path / "s").exists()  # nothing was written
