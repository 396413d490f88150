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


def test_metrics_csv_writes_one_row_per_step(tmp_path):
    import csv

    from latentdiff.loggers import RunCSVLogger

    logger = RunCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_metrics({"lr-AdamW": 1e-4}, step=9)  # the learning rate, logged before the step's batch
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=9)
    logger.save()
    logger.log_metrics({"val/shape_acc": 0.75}, step=9)  # after the row was written
    logger.log_metrics({"lr-AdamW": 2e-4}, step=19)
    logger.log_metrics({"train/loss": 0.4, "epoch": 0}, step=19)
    logger.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["9", "19"]
    assert rows[0]["lr-AdamW"] and rows[0]["train/loss"] == "0.5" and rows[0]["val/shape_acc"] == "0.75"
    assert rows[1]["train/loss"] == "0.4" and not rows[1]["val/shape_acc"]


def test_a_record_one_step_ahead_does_not_split_the_rows(tmp_path):
    import csv

    from latentdiff.loggers import RunCSVLogger

    logger = RunCSVLogger(save_dir=str(tmp_path), name="", version="")
    # Lightning's order with the FID callback, which logs at global_step (one ahead of the step's loss)
    for metrics, step in (
        ({"lr": 1.0}, 0),
        ({"train/loss": 0.9}, 0),
        ({"lr": 1.0}, 1),
        ({"val/shape_acc": 0.5}, 1),
        ({"val/fid_8": 30.0}, 2),
        ({"train/loss": 0.8}, 1),
        ({"lr": 1.0}, 2),
        ({"train/loss": 0.7}, 2),
    ):
        logger.log_metrics(metrics, step=step)
    logger.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert rows[1]["train/loss"] == "0.8" and rows[1]["val/shape_acc"] == "0.5"
    assert rows[2]["val/fid_8"] == "30.0" and rows[2]["train/loss"] == "0.7"
