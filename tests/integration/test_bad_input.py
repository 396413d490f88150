"""The bad-input matrix: every entry point (train.py, sample.py, evaluate.py, extraction, export) answers a
mistake with one line `error: <key>=<value> ...` on stderr, a non-zero exit, no traceback, and leaves every
existing file as it was (a run directory, a checkpoint, a latent store, a samples folder).

The entries run in-process through the same `hydra_entry` the scripts call (the scripts add nothing else),
so the matrix stays fast; `test_cli.py` runs some of them as real subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.extract import run_extraction
from latentdiff.sample import run_sampling
from latentdiff.train import run_training

from ..artefacts import make_image_folder
from ..conftest import TINY_RUN, compose_config, compose_entry
from ..entries import one_line_error
from ..entries import snapshot as _snapshot


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
    (root / "empty.npz").write_bytes(b"")
    (root / "text.npz").write_text("not an archive\n")
    np.savez(root / "nan_stats.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    run_sampling(compose_entry("sample", [f"ckpt={run}/last.ckpt", f"out={root}/samples_out", *_FEW]), _FEW)
    store = root / "store"  # 3 classes of pixels (vae=none); then a copy whose labels go past its classes
    folder = make_image_folder(root / "images_src", per_class=2, corrupt=0)
    extract = [f"data.root={folder}", "resolution=32", "vae=none", "shard_size=4", "num_workers=0", f"out={store}"]
    run_extraction(compose_entry("extract", extract))
    shutil.copytree(store, root / "bad_labels")
    labels = root / "bad_labels/shards/shard-00000/labels.npy"
    np.save(labels, np.full_like(np.load(labels), 7))
    shutil.copytree(store, root / "bad_meta")
    meta = json.loads((root / "bad_meta/store.json").read_text())
    (root / "bad_meta/store.json").write_text(json.dumps({**meta, "count": "six"}))
    return root


_FEW = ["num_samples=2", "sampler.steps=2", "save_png=false", "devices=1"]
_STORE = ["data=latents", "data.image_size=32", "data.num_classes=3", "data.batch_size=2", "data.num_val=2"]
_STORE += ["vae=none", "model=uvit_tiny", "trainer.max_steps=1", "callbacks.sample_grid.every_n_steps=0"]
_LONG = "x" * 5000


# (entry point, arguments with {w} = the world folder, the start of the one-line message)
MATRIX = [
    ("train", ["model=uvit_xxl"], "model=uvit_xxl is not a known option of 'model'; use one of:"),
    ("train", ["model.patch_size=3"], "model.patch_size=3 does not divide the input size 32"),
    ("train", ["model=unet_tiny", "model.block_out_channels=[24,48]"], "model.attention_head_dim=64 must divide"),
    ("train", ["model=dit_tiny", "model.patch_size=3"], "model.patch_size=3 does not divide the input size 32"),
    ("train", ["model=dit_tiny", "sampler=ddpm_learned", "diffusion=linear"], "sampler.scheduler.variance_type="),
    (
        "train",
        ["model=dit_tiny", "model.time_convention=sit", "diffusion=linear", "sampler=ddpm"],
        "model.time_convention=sit feeds the network SiT's flow time, but the objective is Gaussian diffusion",
    ),
    (
        "train",
        ["model=dit_tiny", "model.learn_sigma=true", "diffusion=flow", "sampler=flow_euler"],
        "model.learn_sigma=true adds variance channels that",
    ),
    (
        "train",
        [
            "model=dit_tiny",
            "model.learn_sigma=true",
            "diffusion=linear",
            "sampler=ddpm_learned",
            "sampler.scheduler.variance_type=learned",
        ],
        "sampler.scheduler.variance_type=learned reads the variance",
    ),
    (
        "train",
        [
            "model=dit_tiny",
            "model.learn_sigma=true",
            "diffusion=linear",
            "sampler=dpm_solver",
            "+sampler.scheduler.variance_type=learned_range",
        ],
        "sampler.scheduler.variance_type=learned_range is read by DDPM's step only",
    ),
    (
        "train",
        [
            "model=dit_tiny",
            "model.time_convention=sit",
            "diffusion=flow",
            "sampler=flow_euler",
            "diffusion.scheduler.num_train_timesteps=500",
        ],
        "diffusion.scheduler.num_train_timesteps=500: model.time_convention=sit reads",
    ),
    (
        "train",
        ["diffusion=flow", "sampler=flow_sde", "sampler.scheduler.last_step_size=0"],
        "sampler.scheduler.last_step_size=0",
    ),
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
    # --- issue 17: non-finite or degenerate numbers
    ("train", ["optim.lr=nan"], "optim.lr=nan must be a finite number"),
    ("train", ["optim.lr=inf"], "optim.lr=inf must be a finite number"),
    ("train", ["optim.weight_decay=-inf"], "optim.weight_decay=-inf must be a finite number"),
    ("train", ["sampler.guidance_scale=nan"], "sampler.guidance_scale=nan must be a finite number"),
    ("train", ["module.ema.decay=nan"], "module.ema.decay=nan must be a finite number"),
    ("train", ["data.num_classes=0"], "data.num_classes=0 is not supported by data=shapes; use 1..6"),
    ("train", ["diffusion.scheduler.num_train_timesteps=0"], "diffusion.scheduler.num_train_timesteps=0 must be a"),
    ("train", ["model.patch_size=0"], "model.patch_size=0 must be a positive integer"),
    ("train", ["model.depth=-2"], "model.depth=-2 must be a positive integer"),
    ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be > 0"),
    ("train", ["trainer.max_steps=-5"], "trainer.max_steps=-5 must be a positive integer (or -1)"),
    ("train", ["callbacks.checkpoint.every_n_train_steps=-5"], "callbacks.checkpoint.every_n_train_steps=-5 must be"),
    ("train", ["data.image_size=-32"], "data.image_size=-32 must be a positive integer"),
    ("train", ["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] must be a pair [beta1, beta2], each in [0, 1)"),
    ("train", ["diffusion.scheduler.beta_end=2.0"], "diffusion.scheduler.beta_end=2.0 must be in (0, 1)"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "guidance_scale=nan"], "guidance_scale=nan must be a finite"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "seed=-1"], "seed=-1 must be an integer >= 0"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "sampler.steps=0"], "sampler.steps=0 must be a positive"),
    ("evaluate", ["samples={w}/samples.npz", "reference={w}/nan_stats.npz", "metrics=[fid]"], "reference={w}/nan_"),
    ("evaluate", ["samples={w}/samples.npz", "metrics=[isc]", "num_samples=1"], "num_samples=1 must be an integer >="),
    ("extract", ["data.root={w}/images_src", "out={w}/s", "shard_size=0"], "shard_size=0 must be >= 1"),
    # --- wrong types and shapes
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "use_ema=yes"], "use_ema='yes' must be true or false"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "save_png=maybe"], "save_png='maybe' must be true or false"),
    ("export", ["ckpt={w}/run/last.ckpt", "out={w}/e", "use_ema=1"], "use_ema=1 must be true or false"),
    ("train", ["optim.betas=0.9"], "optim.betas=0.9 must be a pair [a number, a number]"),
    ("train", ["model.qkv_bias=maybe"], "model.qkv_bias='maybe' must be true or false (UViT's qkv_bias)"),
    ("train", ["trainer.max_steps=1.5"], "trainer.max_steps=1.5 must be an integer"),
    ("train", ["data.batch_size=[16]"], "data.batch_size=[16] must be an integer"),
    ("train", ["sampler.guidance_interval=5"], "sampler.guidance_interval=5 must be a pair [a number, a number]"),
    ("train", ["experiment=quickstart_tokens", "vae.pixel_range=0.5"], "vae.pixel_range=0.5 must be a pair [a num"),
    ("evaluate", ["samples={w}/samples.npz", "fidelity.samples_shuffle=sure"], "fidelity.samples_shuffle='sure' must"),
    # --- conflicts that training used to find only once it ran
    ("train", ["model=uvit_s2_t2i"], "model=UViT takes text features but the data gives class ids (module.num_cl"),
    ("train", ["model.num_classes=2"], "model=UViT has 2 class rows but module.num_classes=4 needs 5"),
    ("train", [*_STORE, "data.root={w}/bad_labels"], "data.root={w}/bad_labels: shard 0 holds class id 7, outside"),
    ("train", ["trainer.accelerator=tpu"], "trainer.accelerator=tpu is not available on this machine"),
    ("train", ["trainer.accelerator=banana"], "trainer.accelerator='banana' is not an accelerator; use one of"),
    ("train", ["trainer.precision=transformer-engine"], "trainer.precision=transformer-engine needs NVIDIA's"),
    # --- paths of the wrong kind
    ("train", ["paths.log_dir={w}/notes.txt"], "paths.log_dir={w}/notes.txt is not a folder"),
    ("train", ["resume={w}/notes.txt"], "resume={w}/notes.txt is a file; resume takes a run directory"),
    ("train", ["resume={w}/nowhere"], "resume={w}/nowhere does not exist; use resume=auto"),
    ("train", ["ckpt_path={w}/run"], "ckpt_path={w}/run is a folder; ckpt_path takes a checkpoint file"),
    ("train", ["model.pretrained={w}/notes.txt"], "model.pretrained={w}/notes.txt is not a readable weights file"),
    ("train", [*_STORE, "data.root={w}/bad_meta"], 'data.root={w}/bad_meta: store.json holds count="six"'),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/notes.txt"], "out={w}/notes.txt is a file; out takes a folder"),
    ("export", ["ckpt={w}/run/last.ckpt", "out={w}/notes.txt"], "out={w}/notes.txt is a file; out takes a new folder"),
    ("evaluate", ["samples={w}/empty.npz", "metrics=[isc]"], "samples={w}/empty.npz is not an .npz file"),
    ("evaluate", ["samples={w}/text.npz", "metrics=[isc]"], "samples={w}/text.npz is not an .npz file"),
    (
        "evaluate",
        ["samples={w}/samples.npz", "metrics=[isc]", "inception_weights={w}/notes.txt"],
        "inception_weights={w}/notes.txt is not a readable torch weights file",
    ),
    # --- silent mismatches
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "data.image_size=64"], "data.image_size=64 does not match"),
    (
        "sample",
        ["ckpt={w}/run/last.ckpt", "out={w}/samples_out", *_FEW[:1], "sampler.steps=3", *_FEW[2:]],
        "out={w}/samples_out holds samples made differently: sampler.steps: 2 there, 3 now; choose another out=",
    ),
    # --- a 5,000-character value, a missing mandatory value, misspelt keys
    ("train", [f"model.patch_size={_LONG}"], "model.patch_size='xxxxxxxxxx"),
    ("train", [f"name={_LONG}"], "name='xxxxxxxxxx"),
    ("train", ["data=cifar10"], "data.root=??? is missing (data= chosen has no default for it); set data.root="),
    ("export", ["ckpt={w}/run/last.ckpt"], "out=??? is missing; set out=<value>"),
    ("evaluate", ["metrics=[isc]"], "samples=??? is missing; set samples=<value>"),
    ("train", ["model.patch_sise=3"], "model.patch_sise=3 is not a key of the config; did you mean model.patch_size?"),
    (
        "train",
        ["trainer.max_step=10"],
        "trainer.max_step=10 is not a key of the config; did you mean trainer.max_steps?",
    ),
    ("train", ["+model.patch_sise=3"], "model.patch_sise=3 is not an argument of UViT; did you mean model.patch_size?"),
    ("train", ["sampler.scheduler.solver_ordr=3"], "sampler.scheduler.solver_ordr=3 is not a key of the config; did"),
    ("train", ["trainer.detect_anomaly=true"], "trainer.detect_anomaly=true: trainer.detect_anomaly is not set in"),
    ("sample", ["ckpt={w}/run/last.ckpt", "use_emma=false"], "use_emma=false is not a key of the config; did you mean"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "guidance_scale=abc"], "guidance_scale='abc' must be a number"),
    # --- moved from the subprocess tier (tests/e2e keeps one case per command)
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "model.depth=4"], "ckpt={w}/run/last.ckpt does not fit model"),
    ("sample", ["ckpt={w}/run/last.ckpt", "out={w}/s", "labels=[7]"], "labels=[7] must be class ids in [0, 4)"),
    (
        "extract",
        ["data.root={w}/images_src", "out={w}/s", "vae=sd_ema", "vae.pretrained={w}/no-vae"],
        "vae.pretrained='{w}/no-vae' does not exist -- on a machine with internet run `huggingface-cli download",
    ),
    (
        "extract",
        ["data=coco_captions", "data.images={w}/images", "data.annotations={w}/absent.json", "out={w}/s"],
        "data.annotations={w}/absent.json does not exist",
    ),
    (
        "train",
        ["experiment=quickstart_tokens", "model.vocab_size=100"],
        "model.vocab_size=100 is too small for model.codebook_size=256 and the mask token (id vocab_size - 1); "
        "use model.vocab_size >= 257",
    ),
]


@pytest.mark.parametrize(("entry", "args", "message"), MATRIX, ids=[f"{e}-{'-'.join(a)[:60]}" for e, a, _ in MATRIX])
def test_bad_input_is_one_line_nonzero_exit_and_changes_nothing(world, monkeypatch, capfd, entry, args, message):
    args = case = [a.format(w=world) for a in args]
    message = message.format(w=world)
    if entry == "train":
        tiny = [] if any(a.startswith(("data=", "experiment=")) for a in args) else TINY_RUN
        args = [f"paths.log_dir={world}/outputs", *tiny, *args]
    before = _snapshot(world)
    line, code = one_line_error(entry, args, world, monkeypatch, capfd)
    assert line.startswith(f"error: {message}"), line
    assert code == 2, line
    assert len(line) < 400, line  # one short line, whatever the value's length
    assert _snapshot(world) == before  # nothing existing changed, nothing new written
    print(f"{entry}.py {' '.join(case).replace(str(world), '<w>')}")
    print(f"  -> {line.replace(str(world), '<w>')} (exit {code})")


def test_offline_sd_ema_says_what_to_download(world, monkeypatch, capfd):
    args = [f"data.root={world}/images_src", f"out={world}/s", "vae=sd_ema"]
    line, code = one_line_error("extract", args, world, monkeypatch, capfd)
    assert code == 2
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir <dir>" in line
    assert "set vae.pretrained=<dir>" in line


def test_offline_inception_download_names_the_url_and_the_option(world, tmp_path, monkeypatch, capfd):
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = [f"samples={world}/samples.npz", "metrics=[isc]", "device=cpu"]
    line, code = one_line_error("evaluate", args, world, monkeypatch, capfd)
    assert code == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "set inception_weights=<file>" in line
