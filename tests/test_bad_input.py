"""The bad-input matrix: every entry point (train.py, sample.py, evaluate.py, extraction, export) answers a
mistake with one line `error: <key>=<value> ...` on stderr, a non-zero exit, no traceback, and leaves every
existing file as it was (a run directory, a checkpoint, a latent store, a samples folder).

The entries run in-process through the same `hydra_entry` the scripts call (the scripts add nothing else),
so the matrix stays fast; `test_cli.py` runs some of them as real subprocesses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from latentdiff.training import run_training

from .conftest import TINY_RUN, compose_config
from .entries import entry as _entry
from .entries import snapshot as _snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder holding what users have on disk: a finished run, damaged checkpoints, a samples npz."""
    root = tmp_path_factory.mktemp("world")
    cfg = compose_config(TINY_RUN, root)
    run_training(cfg)
    run = root / "run"
    data = (run / "last.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    (root / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weight": torch.ones(2)}, root / "plain.pt")
    (root / "empty_run").mkdir()
    (root / "images").mkdir()
    (root / "images" / "mine.png").write_bytes(b"a user's image")
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    (root / "notes.txt").write_text("a user's file\n")
    return root


# (entry point, arguments with {w} = the world folder, the start of the one-line message)
MATRIX = [
    ("train", ["model=uvit_xxl"], "model=uvit_xxl is not a known option of 'model'; use one of:"),
    ("train", ["model.patch_size=3"], "model.patch_size=3 does not divide the input size 32"),
    ("train", ["optim.lr=-1e-4"], "optim.lr=-0.0001 must be > 0"),
    ("train", ["module.p_uncond=1.5"], "module.p_uncond=1.5 is outside [0, 1)"),
    ("train", ["model.skip=sideways"], "model.skip='sideways' is not allowed; use one of"),
    ("train", ["trainer.precision=fp8"], "trainer.precision='fp8' is not supported; use one of"),
    ("train", ["data.batch_size=0"], "data.batch_size=0 must be a positive integer"),
    ("train", ["data.num_train=8", "data.batch_size=16"], "data.batch_size=16 is larger than data.num_train=8"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0 must be a positive integer"),
    ("train", ["optim.lrr=1e-4"], "optim.lrr=1e-4 is not a key of the config; did you mean optim.lr?"),
    ("train", ["data.batch_size=big"], "data.batch_size='big' must be an integer"),
    ("train", ["module.ema.decay=1.5"], "module.ema.decay=1.5 must be in [0, 1)"),
    ("train", ["sampler=flow_euler"], "sampler.scheduler=FlowMatchEulerDiscreteScheduler cannot sample a Gaussian"),
    ("train", ["module.nonfinite.policy=ignore"], "module.nonfinite.policy='ignore' is not allowed; use one of"),
    ("train", ["data=latents", "data.root={w}/no-store"], "data.root={w}/no-store does not exist"),
    ("train", ["ckpt_path={w}/absent.ckpt"], "ckpt_path={w}/absent.ckpt does not exist"),
    ("train", ["ckpt_path={w}/truncated.ckpt"], "ckpt_path={w}/truncated.ckpt is not a readable checkpoint (truncated"),
    ("train", ["ckpt_path={w}/garbage.ckpt"], "ckpt_path={w}/garbage.ckpt is not a readable checkpoint"),
    ("train", ["ckpt_path={w}/plain.pt"], "ckpt_path={w}/plain.pt is not a latentdiff training checkpoint"),
    (
        "train",
        ["resume={w}/run", "model.embed_dim=64"],
        "resume={w}/run (last.ckpt) was trained with another configuration: model.embed_dim=64 (checkpoint: 128)",
    ),
    ("train", ["resume={w}/run", "data.image_size=64"], "resume={w}/run (last.ckpt) was trained with another"),
    ("train", ["resume={w}/empty_run"], "resume={w}/empty_run holds no readable checkpoint"),
    ("train", ["hydra.run.dir={w}/run"], "paths.output_dir={w}/run already holds a run"),
    ("sample", ["ckpt={w}/absent.ckpt", "out={w}/s"], "ckpt={w}/absent.ckpt does not exist"),
    ("sample", ["ckpt={w}/truncated.ckpt", "out={w}/s"], "ckpt={w}/truncated.ckpt is not a readable checkpoint"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "num_samples=0"], "num_samples=0 must be a positive integer"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "precision=fp8"], "precision='fp8' is not supported"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "sampler=flow_euler"], "sampler.scheduler=FlowMatchEuler"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/images"], "out={w}/images is not empty and holds no samples.json"),
    ("evaluate", ["samples={w}/absent.npz", "reference={w}/samples.npz"], "samples={w}/absent.npz does not exist"),
    ("evaluate", ["samples={w}/samples.npz", "metrics=[fid,nope]", "reference={w}/samples.npz"], "metrics=["),
    ("evaluate", ["samples={w}/samples.npz", "reference={w}/absent.npz"], "reference={w}/absent.npz does not exist"),
    ("extract", ["data.root={w}/absent", "out={w}/store"], "data.root={w}/absent does not exist"),
    ("extract", ["data.root={w}/images"], "out=??? is missing"),
    ("export", ["ckpt={w}/truncated.ckpt", "out={w}/export"], "ckpt={w}/truncated.ckpt is not a readable checkpoint"),
    ("export", ["ckpt={w}/run/last.ckpt", "out={w}/run"], "out={w}/run exists and is not empty"),
]


@pytest.mark.parametrize(("entry", "args", "message"), MATRIX, ids=[f"{e}-{'-'.join(a)[:60]}" for e, a, _ in MATRIX])
def test_bad_input_is_one_line_nonzero_exit_and_changes_nothing(world, monkeypatch, capfd, entry, args, message):
    args = case = [a.format(w=world) for a in args]
    message = message.format(w=world)
    if entry == "train":
        tiny = [] if "data=latents" in args else TINY_RUN
        args = [f"paths.log_dir={world}/outputs", *tiny, *args]
    before = _snapshot(world)
    monkeypatch.chdir(world)
    monkeypatch.setattr(sys, "argv", [f"{entry}.py", *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    GlobalHydra.instance().clear()
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _entry(entry)()
    err = capfd.readouterr().err
    assert exit_info.value.code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {message}"), lines[0]
    assert "Traceback" not in err
    assert _snapshot(world) == before  # nothing existing changed, nothing new written
    print(f"{entry}.py {' '.join(case).replace(str(world), '<w>')}")
    print(f"  -> {lines[0].replace(str(world), '<w>')} (exit {exit_info.value.code})")
