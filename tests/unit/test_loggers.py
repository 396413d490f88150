"""Loggers: CSV always; TensorBoard; wandb offline without credentials and never prompting."""

from __future__ import annotations

import pytest

from latentdiff.loggers import wandb_logged_in, wandb_logger


def test_wandb_chooses_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()
    with pytest.raises(ValueError, match="logger.wandb.mode='cloud' is not supported"):
        wandb_logger(mode="cloud")
