"""evaluate.py against torch-fidelity itself, with a random-weight Inception in torch-fidelity's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch_fidelity
from omegaconf import OmegaConf

from latentdiff.evaluate import run_evaluation
from latentdiff.inception import Inception
from latentdiff.metrics import NpzImages

from ..entries import one_line_error
from ..helpers.metrics import N, make_sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two image sets as npz (ADM layout) and as PNG folders, plus the Inception weights file."""
    return make_sets(tmp_path_factory.mktemp("metrics"))


def _evaluate(sets, tmp_path, **kwargs) -> dict:
    cfg = OmegaConf.create(
        {
            "samples": str(sets["root"] / "a.npz"),
            "reference": str(sets["root"] / "b"),
            "metrics": ["fid", "isc", "kid"],
            "num_samples": None,
            "inception_weights": str(sets["weights"]),
            "batch_size": 16,
            "device": "cpu",
            "cache_dir": str(sets["root"] / "cache"),  # reference features, shared by the module's tests
            "write_stats": None,
            "out": str(tmp_path / "metrics.json"),
            "fidelity": {"kid_subset_size": 40, "isc_splits": 4},
            **kwargs,
        }
    )
    return run_evaluation(cfg)


def test_evaluate_equals_torch_fidelity(sets, tmp_path):
    ours = _evaluate(sets, tmp_path)["metrics"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(sets["root"] / "a"),
        input2=str(sets["root"] / "b"),
        cuda=False,
        fid=True,
        isc=True,
        kid=True,
        feature_extractor_weights_path=str(sets["weights"]),
        kid_subset_size=40,
        isc_splits=4,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert ours["fid"] > 1 and ours["isc_mean"] > 1.5  # real distances, not a degenerate extractor
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-4, rel=1e-4)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], abs=1e-4)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-4)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["provenance"]["inception"]["sha256"] and record["provenance"]["num_samples"] == N


def test_fid_of_a_set_with_itself_is_zero(sets, tmp_path):
    values = _evaluate(sets, tmp_path, reference=str(sets["root"] / "a"), metrics=["fid"])["metrics"]
    assert abs(values["fid"]) < 1e-2  # eigenvalue round-off of a rank-48 covariance; a vs b is > 1


def test_statistics_reference_gives_the_image_reference_fid(sets, tmp_path):
    stats = tmp_path / "b_stats.npz"
    _evaluate(sets, tmp_path, samples=str(sets["root"] / "b.npz"), reference=None, metrics=[], write_stats=str(stats))
    with np.load(stats) as npz:
        assert set(npz.files) == {"mu", "sigma"} and npz["sigma"].dtype == np.float64
    from_images = _evaluate(sets, tmp_path, metrics=["fid"])["metrics"]["fid"]
    from_stats = _evaluate(sets, tmp_path, reference=str(stats), metrics=["fid"])["metrics"]["fid"]
    assert from_stats == pytest.approx(from_images, rel=1e-5, abs=1e-5)


def test_reference_features_are_cached_with_provenance(sets, tmp_path):
    first = _evaluate(sets, tmp_path, metrics=["fid"], cache_dir=str(tmp_path / "cache"))  # a cache of its own
    cache = first["provenance"]["reference"]["cache"]
    assert Path(cache).is_file() and Path(cache).with_suffix(".json").is_file()
    assert json.loads(Path(cache).with_suffix(".json").read_text())["count"] == N
    again = _evaluate(sets, tmp_path, metrics=["fid"], cache_dir=str(tmp_path / "cache"))
    assert again["metrics"]["fid"] == first["metrics"]["fid"]


def test_npz_images_stream_in_chunks(sets):
    images = NpzImages(sets["root"] / "a.npz")
    got = np.concatenate(list(images.batches(chunk=7)))
    assert np.array_equal(got, sets["a"])
    feats = Inception(str(sets["weights"]), batch_size=5).features(images.batches(limit=10, chunk=3))
    assert feats["2048"].shape == (10, 2048)


def _bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    np.savez(root / "float.npz", arr_0=np.zeros((4, 32, 32, 3), np.float32))
    np.savez(root / "noarr.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(root / "mu_only.npz", mu=np.zeros(2048))
    np.savez(root / "big.npz", arr_0=np.zeros((N, 64, 64, 3), np.uint8))
    return [
        (["samples=float.npz"], "samples=float.npz: arr_0 is float32 [4, 32, 32, 3]; expected uint8 images"),
        (["samples=noarr.npz"], "samples=noarr.npz has no arr_0 (images); it holds images"),
        (["reference=mu_only.npz"], "reference=mu_only.npz holds mu or sigma but not both"),
        (["reference=big.npz"], "samples=a.npz are 32x32 but reference=big.npz is 64x64"),
        (["num_samples=50000"], f"samples=a.npz holds {N} images, fewer than num_samples=50000"),
        (["metrics=[fid,sfid]"], "metrics=['fid', 'sfid']: sfid is not a metric; use any of fid, isc, kid, prc"),
        (["reference=null"], "metrics=['fid'] need reference="),
    ]


def test_bad_input_is_one_line_and_nonzero_exit(sets, monkeypatch, capfd):
    """evaluate.py's mistakes about its files, through the entry point as its script runs it (in-process; the
    subprocess tier runs the first of them as a real `python evaluate.py`)."""
    root = sets["root"]
    for args, message in _bad_inputs(root):
        argv = ["samples=a.npz", "reference=b.npz", "metrics=[fid]", "device=cpu"]
        argv += [f"inception_weights={sets['weights']}", "cache_dir=null", *args]
        line, code = one_line_error("evaluate", argv, root, monkeypatch, capfd)
        assert code == 2 and line.startswith("error: ") and message in line, (args, line)
