"""Sweeps and the report: `train.py sweep=tiny` runs a 4-run multirun of the quickstart on the built-in data,
evaluate.py scores two runs, and `latentdiff.report` writes a table and plots that hold the runs' numbers."""

from __future__ import annotations

import pytest

from latentdiff.errors import ConfigError
from latentdiff.report import main as report_main
from latentdiff.report import write_report


def test_report_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="holds no runs"):
        write_report([tmp_path])
    with pytest.raises(ConfigError, match="does not exist"):
        write_report([tmp_path / "missing"])
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not a report"):
        write_report([tmp_path], out=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report_main(["dirr=x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: dirr=x is not an option; use dir=<multirun dir> [out=<dir>]"
