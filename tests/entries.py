"""Run an entry point (train.py, sample.py, evaluate.py, extraction, export) in-process, as its script would,
and read what a user sees: the exit status and stderr. Used by the bad-input matrix and the trust tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from latentdiff.cli import CONF_DIR, hydra_entry


def entry(name: str):
    """The `main` of an entry point: `hydra_entry` with the arguments its script passes."""
    if name == "train":
        from latentdiff.precheck import check_train
        from latentdiff.train import train

        return lambda: hydra_entry(train, CONF_DIR, "train", precheck=check_train)
    if name == "sample":
        from latentdiff.sample import run_sampling

        return lambda: hydra_entry(run_sampling, CONF_DIR, "sample", cleanup_run_dir=False, pass_overrides=True)
    if name == "evaluate":
        from latentdiff.evaluate import run_evaluation

        return lambda: hydra_entry(run_evaluation, CONF_DIR, "evaluate", cleanup_run_dir=False)
    if name == "extract":
        from latentdiff.extract import run_extraction

        return lambda: hydra_entry(run_extraction, CONF_DIR, "extract", cleanup_run_dir=False)
    if name == "export":
        from latentdiff.export import run_export

        return lambda: hydra_entry(run_export, CONF_DIR, "export", cleanup_run_dir=False)
    raise KeyError(name)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time (folders: -1)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = (-1, 0)
    return out


def one_line_error(name: str, args: list[str], cwd: Path, monkeypatch, capfd) -> tuple[str, int]:
    """Run entry point `name` with `args` from `cwd`; assert a non-zero exit and exactly one stderr line with no
    traceback, and return (that line, the exit status)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (this process imported it already): offline as a fresh
    # `python <script>.py` run with HF_HUB_OFFLINE=1 would be, without a network attempt that times out
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    GlobalHydra.instance().clear()
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry(name)()
    out, err = capfd.readouterr()
    assert exit_info.value.code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    return lines[0], int(exit_info.value.code)
