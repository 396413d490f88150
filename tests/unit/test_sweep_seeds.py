"""An ablation repeated over seeds: one row per setting with the mean and the min-max of each number."""

from __future__ import annotations

import pytest

from latentdiff.sweep_runs import RunRow
from latentdiff.sweep_seeds import by_setting, is_seeded, numbers, table


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
        seed=seed,
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
    assert cells[0] == [
        "concat_linear",
        "0,1",
        "0.950 (0.900-1.000)",
        "15.00 (10.00-20.00)",
        "0.0600 (0.0500-0.0700)",
        "100.0 (100.0-100.0)",
    ]


def test_a_sweep_without_repeated_settings_is_not_seeded():
    assert not is_seeded([_row("add", "0", 0.9, 1.0, 0.1), _row("none", "1", 0.9, 1.0, 0.1)])
    plain = [_row("add", "0", 0.9, 1.0, 0.1), _row("none", "0", 0.9, 1.0, 0.1)]
    for r in plain:
        r.swept.pop("seed")
    assert not is_seeded(plain)


def test_a_number_missing_for_some_seeds_says_how_many_it_averages():
    groups = by_setting([_row("add", "0", None, None, 0.1), _row("add", "1", None, None, 0.2)])
    header, cells = table(groups)
    assert "shape acc mean (min-max)" not in header
    assert cells == [["add", "0,1", "0.1500 (0.1000-0.2000)", "100.0 (100.0-100.0)"]]
    groups = by_setting(
        [_row("add", "0", 0.5, 9.0, 0.1), _row("add", "1", None, None, 0.2), _row("add", "2", 0.7, 7.0, 0.3)]
    )
    _, cells = table(groups)
    assert cells[0][2:4] == ["0.600 (0.500-0.700, n=2)", "8.00 (7.00-9.00, n=2)"]
    header, cells = numbers(groups)
    assert header[:6] == ["model.skip", "seeds", "shape_acc_mean", "shape_acc_min", "shape_acc_max", "shape_acc_n"]
    assert [float(c) for c in cells[0][2:5]] == pytest.approx([0.6, 0.5, 0.7]) and cells[0][5] == "2"


def test_the_report_of_two_sweeps_over_seeds_has_a_by_setting_table(tmp_path):
    """Seeds from config.yaml (the first sweep never named its seed), settings across two multirun dirs."""
    from omegaconf import OmegaConf

    from latentdiff.report import write_report

    from ..conftest import TINY_RUN, compose_config

    cfg = compose_config(TINY_RUN)
    scores = {("a", "0"): 0.5, ("a", "1"): 0.7, ("b", "0"): 0.9, ("b", "1"): 1.0}
    for (sweep, seed), acc in scores.items():
        run = tmp_path / sweep / seed
        (run / ".hydra").mkdir(parents=True)
        cfg.seed = int(seed)
        OmegaConf.save(cfg, run / "config.yaml")
        overrides = [f"model.skip={'add' if sweep == 'a' else 'none'}"] + ([f"seed={seed}"] if seed == "1" else [])
        OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
        (run / "metrics.csv").write_text(f"step,val/loss_ema,val/shape_acc,val/fd_shapes\n1499,0.1,{acc},{10 * acc}\n")
    result = write_report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "report")
    md = result["markdown"]
    assert "## By setting (mean over the seeds, min-max in parentheses)" in md
    assert "| add | 0,1 | 0.600 (0.500-0.700) | 6.00 (5.00-7.00) |" in md
    assert "| none | 0,1 | 0.950 (0.900-1.000) | 9.50 (9.00-10.00) |" in md
    assert (tmp_path / "report" / "by_setting.png").is_file()
    rows = (tmp_path / "report" / "by_setting.csv").read_text().splitlines()
    assert rows[0].startswith("model.skip,seeds,shape_acc_mean") and rows[1].startswith("add,0 1,0.6")
