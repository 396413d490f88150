"""An ablation repeated over seeds: one row per setting with the mean and the min-max of each number."""

from __future__ import annotations

import pytest

from latentdiff.sweep_runs import RunRow
from latentdiff.sweep_seeds import by_setting, is_seeded, table


def _row(skip: str, seed: str, acc: float | None, fd: float | None, loss: float) -> RunRow:
    return RunRow(
        run=f"{skip}-{seed}",
        path=f"/runs/{skip}-{seed}",
        swept={"model.skip": skip, "seed": seed},
        model="UViT",
        params_m=1.0,
        gflops=0.1,
        img_per_s=100.0,
        step=1500,
        train_loss=None,
        val_loss=None,
        val_loss_ema=loss,
        fid=None,
        fid_setup="",
        shape_acc=acc,
        fd_shapes=fd,
    )


def test_settings_average_their_seeds_in_first_seen_order():
    rows = [
        _row("concat_linear", "0", 0.9, 10.0, 0.05),
        _row("none", "0", 0.5, 80.0, 0.07),
        _row("concat_linear", "1", 1.0, 20.0, 0.07),
        _row("none", "1", 0.6, 100.0, 0.09),
    ]
    assert is_seeded(rows)
    groups = by_setting(rows)
    assert [g.setting for g in groups] == [{"model.skip": "concat_linear"}, {"model.skip": "none"}]
    assert [g.seeds for g in groups] == [["0", "1"], ["0", "1"]]
    assert groups[0].numbers["shape_acc"].mean == pytest.approx(0.95)
    assert groups[1].numbers["fd_shapes"].values == [80.0, 100.0]
    assert groups[0].label == "skip=concat_linear"
    header, cells = table(groups)
    assert header == [
        "model.skip",
        "seeds",
        "shape acc mean (min-max)",
        "FD-shapes mean (min-max)",
        "val loss (EMA) mean (min-max)",
        "img/s mean (min-max)",
    ]  # no FID column: no run has one
    assert cells[0] == ["concat_linear", "0,1", "0.950 (0.900-1.000)", "15.00 (10.00-20.00)", "0.0600 (0.0500-0.0700)",
                        "100.0 (100.0-100.0)"]


def test_a_sweep_without_repeated_settings_is_not_seeded():
    assert not is_seeded([_row("add", "0", 0.9, 1.0, 0.1), _row("none", "1", 0.9, 1.0, 0.1)])
    plain = [_row("add", "0", 0.9, 1.0, 0.1), _row("none", "0", 0.9, 1.0, 0.1)]
    for r in plain:
        r.swept.pop("seed")
    assert not is_seeded(plain)


def test_a_run_without_judge_scores_leaves_its_cells_empty():
    groups = by_setting([_row("add", "0", None, None, 0.1), _row("add", "1", None, None, 0.2)])
    header, cells = table(groups)
    assert "shape acc mean (min-max)" not in header
    assert cells == [["add", "0,1", "0.1500 (0.1000-0.2000)", "100.0 (100.0-100.0)"]]
