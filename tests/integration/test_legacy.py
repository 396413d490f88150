"""Files written before the redesign of issue 18 still load: checkpoints, exports and a latent store made by the
code of commit d965f91 (`tests/data/legacy/make_legacy.py`), read through the commands users run, give what that
code computed from them (`tests/data/legacy/expected/`).

The files are read in place, never written: a command that writes (a resumed run, sampling) gets a copy or an
`out=` under `tmp_path`. The store's tiny VAE is rebuilt (`make_tiny_vae(seed=0)`, the same weights) and handed
over as `vae.pretrained`: the store records the path it had when it was made, which no loader reads.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentdiff.autoencoder import FrozenAutoencoderKL
from latentdiff.data import LatentDataModule, LatentStore
from latentdiff.errors import ConfigError
from latentdiff.sample import run_sampling
from latentdiff.train import run_training
from latentdiff.verify import main as verify_main
from latentdiff.verify import verify_path

from ..artefacts import TINY_VAE_FACTOR, make_tiny_vae
from ..conftest import compose_config, compose_entry
from ..helpers.legacy import EXPECTED, LEGACY, read_csv_rows, read_npz


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["uvit", "tokens"])
def test_sample_py_on_a_legacy_checkpoint_makes_the_same_images(name, tmp_path):
    out = tmp_path / "samples"
    args = [f"ckpt={LEGACY / f'{name}_run' / 'last.ckpt'}", f"out={out}", *EXPECTED[f"{name}_sample"]]
    result = run_sampling(compose_entry("sample", args), args)
    assert result["complete"] and result["global_step"] == 2 and result["weights"] == "ema"
    made, expected = read_npz(out / "samples.npz"), read_npz(LEGACY / "expected" / f"samples_{name}.npz")
    assert made.keys() == expected.keys() == {"arr_0", "arr_1"}
    assert made["arr_0"].shape == expected["arr_0"].shape == (6, 32, 32, 3) and made["arr_0"].dtype == np.uint8
    assert np.array_equal(made["arr_1"], expected["arr_1"])
    # the float sampling loop may round an 8-bit value the other way on another CPU: one level at most
    assert np.abs(made["arr_0"].astype(int) - expected["arr_0"].astype(int)).max() <= 1
    assert len({image.tobytes() for image in expected["arr_0"]}) == 6  # the reference is not a constant image


def test_a_legacy_quickstart_run_under_todays_defaults_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "uvit_run", run)
    cfg = compose_config([*EXPECTED["uvit_run"], "trainer.max_steps=3", f"resume={run}"], tmp_path)
    with pytest.raises(ConfigError, match=r"was trained with another configuration: diffusion\._target_") as err:
        run_training(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_legacy_run_directory_resumes_for_one_more_step(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "uvit_run", run)
    then = ["diffusion=cosine_v", "diffusion.loss_weighting=none", "sampler=dpm_solver"]  # the quickstart of then
    overrides = [*EXPECTED["uvit_run"], *then, "trainer.max_steps=3", f"resume={run}"]
    result = run_training(compose_config(overrides, tmp_path))
    assert result["global_step"] == EXPECTED["resumed_step"] == 3
    assert math.isclose(result["metrics"]["train/loss"], EXPECTED["resumed_train_loss"], rel_tol=1e-5)
    state = torch.load(run / "last.ckpt", weights_only=True)["state_dict"]
    expected = load_file(str(LEGACY / "expected" / "resumed_uvit.safetensors"))
    assert any(k.startswith("ema.model.") for k in expected) and any(k.startswith("backbone.") for k in expected)
    before = torch.load(LEGACY / "uvit_run" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in expected.items())
    for key, value in expected.items():  # the weights, and the step's update (the lr is small in warm-up)
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-8, msg=key)
        torch.testing.assert_close(state[key] - before[key], value - before[key], rtol=1e-3, atol=1e-9, msg=key)
    old, new = read_csv_rows(LEGACY / "uvit_run" / "metrics.csv"), read_csv_rows(run / "metrics.csv")
    before = [(r["step"], r["train/loss"]) for r in old if r["train/loss"]]
    assert len(before) == 2 and [(r["step"], r["train/loss"]) for r in new if r["train/loss"]][:2] == before
    assert any(r["step"] == "2" and r["train/loss"] for r in new)  # the legacy history, then the new step


# ------------------------------------------------------------------------------------------ latent store
@pytest.fixture
def store(tmp_path) -> Path:
    """A copy of the legacy store (the datamodule and verify only read, but a copy keeps the test data clean)."""
    return Path(shutil.copytree(LEGACY / "store", tmp_path / "store"))


def test_a_legacy_store_verifies_and_gives_the_same_first_batch(store, tmp_path, capsys):
    assert [{k: r[k] for k in ("kind", "bytes")} for r in verify_path(store)] == EXPECTED["verify"]["store"]
    verify_main([f"path={store}"])
    assert capsys.readouterr().out.startswith(f"ok: {store} (latent store)")
    meta, expected_meta = LatentStore(store).meta, EXPECTED["store_meta"]
    for key in ("count", "num_shards", "latent_shape", "moments_shape", "classes", "num_classes", "views"):
        assert meta[key] == expected_meta[key], key
    datamodule = LatentDataModule(root=str(store), **EXPECTED["store_data"])
    batch = next(iter(datamodule.train_dataloader()))
    expected = read_npz(LEGACY / "expected" / "store_batch.npz")
    assert batch.keys() == expected.keys() and {"moments", "cond", "index"} <= batch.keys()
    for key, value in expected.items():
        assert batch[key].numpy().dtype == value.dtype and np.array_equal(batch[key].numpy(), value), key
    datamodule.check_autoencoder(FrozenAutoencoderKL(str(make_tiny_vae(tmp_path / "vae", seed=0))))
    with pytest.raises(ValueError, match="was made with another VAE encoder"):
        datamodule.check_autoencoder(FrozenAutoencoderKL(str(make_tiny_vae(tmp_path / "vae1", seed=1))))


@pytest.mark.slow
def test_training_runs_on_a_legacy_store(store, tmp_path):
    vae = make_tiny_vae(tmp_path / "vae", seed=0)
    overrides = [
        "data=latents",
        f"data.root={store}",
        "data.num_classes=3",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.num_val=4",
        "vae=local",
        f"vae.pretrained={vae}",
        f"vae.downsample_factor={TINY_VAE_FACTOR}",
        "model=uvit_tiny",
        "model.patch_size=2",
        "model.embed_dim=16",
        "model.depth=2",
        "model.num_heads=2",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "callbacks.sample_grid=null",
        "callbacks.loss_curve=null",
    ]
    result = run_training(compose_config(overrides, tmp_path))
    assert result["global_step"] == 1 and math.isfinite(result["metrics"]["val/loss"])
