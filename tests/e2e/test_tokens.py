"""The masked-token backbone (diffusers UVit2DModel + VQModel + AmusedScheduler): equal to diffusers and to aMUSEd's
recipe, extraction -> training -> sampling -> evaluation on tiny artefacts, checkpoint round trip, one-line errors."""

from __future__ import annotations

from ..conftest import ROOT
from ..helpers.cli import run_python


def test_the_cli_error_is_one_line_with_exit_2(tmp_path):
    proc = run_python(tmp_path, [str(ROOT / "train.py"), "experiment=quickstart_tokens", "model.vocab_size=100"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: model.vocab_size=100 is too small for model.codebook_size=256 and the mask token "
        "(id vocab_size - 1); use model.vocab_size >= 257"
    ]
