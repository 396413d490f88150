"""evaluate.py against torch-fidelity itself, with a random-weight Inception in torch-fidelity's format."""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import ROOT
from ..helpers.cli import run_python
from ..helpers.metrics import make_sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two image sets as npz (ADM layout) and as PNG folders, plus the Inception weights file."""
    return make_sets(tmp_path_factory.mktemp("metrics"))


def test_bad_input_is_one_line_and_nonzero_exit(sets):
    """One case as a subprocess of evaluate.py; the others are in-process (tests/integration/test_metrics.py)."""
    root = sets["root"]
    np.savez(root / "float.npz", arr_0=np.zeros((4, 32, 32, 3), np.float32))
    argv = [str(ROOT / "evaluate.py"), "samples=float.npz", "reference=b.npz", "metrics=[fid]", "device=cpu"]
    result = run_python(root, [*argv, f"inception_weights={sets['weights']}", "cache_dir=null"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    expected = "samples=float.npz: arr_0 is float32 [4, 32, 32, 3]; expected uint8 images"
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
