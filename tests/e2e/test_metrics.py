"""evaluate.py against torch-fidelity itself, with a random-weight Inception in torch-fidelity's format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ..conftest import ROOT
from ..helpers.cli import run_python
from ..helpers.metrics import N, make_sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two image sets as npz (ADM layout) and as PNG folders, plus the Inception weights file."""
    return make_sets(tmp_path_factory.mktemp("metrics"))


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


def test_bad_input_is_one_line_and_nonzero_exit(sets):
    root = sets["root"]
    for args, message in _bad_inputs(root):
        argv = [str(ROOT / "evaluate.py"), "samples=a.npz", "reference=b.npz", "metrics=[fid]", "device=cpu"]
        argv += [f"inception_weights={sets['weights']}", "cache_dir=null", *args]
        result = run_python(root, argv)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_offline_inception_download_names_the_url_and_the_option(sets, tmp_path):
    argv = [str(ROOT / "evaluate.py"), f"samples={sets['root'] / 'a.npz'}", "metrics=[isc]", "device=cpu"]
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    result = run_python(tmp_path, argv, **env)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "set inception_weights=<file>" in line
