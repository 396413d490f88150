"""The shapes judge (latentdiff.judge): accurate on real shapes, scores real images high and near the floor, noise
and wrong labels low and far above it; evaluate.py scores a samples file with it; a shapes run logs its scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentdiff.data.shapes import render_shapes
from latentdiff.evaluate import run_evaluation
from latentdiff.judge import JUDGE_SEED, cache_file, judge_samples, load_judge, train_judge
from latentdiff.train import run_training

from ..conftest import TINY_RUN, compose_config


@pytest.fixture(scope="module")
def judge():
    return load_judge(32)


def test_the_judge_is_accurate_on_held_out_shapes_and_cached(judge):
    images, labels = render_shapes(3000, 32, 6, seed=123_457)  # a set neither the judge nor its test saw
    accuracy = float((judge.read(images)[0] == labels).double().mean())
    print(f"judge accuracy on 3000 real 32x32 shapes of 6 classes: {accuracy:.4f}")
    assert accuracy >= 0.995
    state = torch.load(cache_file(32, JUDGE_SEED), weights_only=True)
    assert state["accuracy"] >= 0.995 and state["seed"] == JUDGE_SEED
    again = load_judge(32)  # read from the cache: the same weights
    pairs = zip(judge.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_the_same_seed_trains_the_same_judge(monkeypatch):
    import latentdiff.judge as judge_module

    monkeypatch.setattr(judge_module, "STEPS", 20)  # a short training: the same seed twice, the same weights
    monkeypatch.setattr(judge_module, "TRAIN_IMAGES", 600)
    monkeypatch.setattr(judge_module, "MIN_ACCURACY", 0.0)
    (a, _), (b, _) = train_judge(32, JUDGE_SEED), train_judge(32, JUDGE_SEED)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    (c, _) = train_judge(32, JUDGE_SEED + 10)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_real_shapes_score_high_and_near_the_floor(judge):
    images, labels = render_shapes(512, 32, 4, seed=98_765)
    scores = judge_samples(images, labels, judge)
    print(scores)
    assert scores["shape_acc"] >= 0.99
    assert scores["fd_shapes"] < 2 * scores["fd_shapes_floor"]


def test_noise_and_wrong_labels_score_near_chance_and_far_above_the_floor(judge):
    images, labels = render_shapes(512, 32, 4, seed=98_765)
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    circles = images[labels == 0].repeat(4, 1, 1, 1)[: len(labels)]  # every sample a circle, whatever was asked
    blurred = torch.nn.functional.avg_pool2d(images.float(), 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    scores = {
        "noise": judge_samples(noise, labels, judge),
        "wrong labels": judge_samples(images, (labels + 1) % 4, judge),
        "only circles": judge_samples(circles, labels, judge),
        "8x8 blobs": judge_samples(blurred.round().to(torch.uint8), labels, judge),
    }
    for name, value in scores.items():
        print(name, value)
    for name in ("noise", "wrong labels", "only circles"):
        assert scores[name]["shape_acc"] <= 0.35, name  # chance is 0.25 for 4 balanced classes
    for name in ("noise", "only circles", "8x8 blobs"):
        assert scores[name]["fd_shapes"] > 10 * scores[name]["fd_shapes_floor"], name
    # FD compares distributions, not conditioning: right images under the wrong labels keep a real FD (the judge's
    # accuracy is what sees them)
    assert scores["wrong labels"]["fd_shapes"] < 2 * scores["wrong labels"]["fd_shapes_floor"]


def test_evaluate_scores_a_samples_file_with_the_judge_and_no_inception(judge, tmp_path):
    images, labels = render_shapes(200, 32, 4, seed=55_555)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=nhwc, arr_1=labels.numpy())
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "evaluate.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.samples, cfg.metrics, cfg.inception_weights = str(tmp_path / "samples.npz"), ["shapes"], "/nonexistent"
    record = run_evaluation(cfg)
    assert record["metrics"] == pytest.approx(judge_samples(nhwc, labels.numpy(), judge))
    assert record["provenance"]["inception"] is None and record["provenance"]["judge"]["seed"] == JUDGE_SEED
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["shape_acc"] >= 0.95


def test_a_shapes_run_logs_the_judges_scores_on_the_row_of_its_step(judge, tmp_path):
    overrides = [*TINY_RUN, "callbacks.sample_grid.every_n_steps=3", "callbacks.sample_grid.samples_per_class=4"]
    run = Path(run_training(compose_config(overrides, tmp_path))["run_dir"])
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), steps  # one row per step
    (scored,) = [r for r in rows if r.get("val/shape_acc")]
    assert scored["train/loss"] and scored["lr-AdamW"]  # the judge, the loss and the lr of one step share a row
    assert 0 <= float(scored["val/shape_acc"]) <= 1 and float(scored["val/fd_shapes_floor"]) > 0
    from PIL import Image

    (grid,) = (run / "samples").glob("*.png")
    width, height = Image.open(grid).size
    assert height == 4 * 34 + 2 and width > 4 * 34 + 2 + 20  # 4 rows of 4 samples, and a margin of row names
