"""LightningDiT's pipeline end to end on CPU: `vae=vavae_f16d32` (an LDM-layout checkpoint with per-channel latent
statistics) extracts a store, a LightningDiT on SiT's time trains on it, `sample.py` draws from it, and the export's
`LatentdiffPipeline` draws the same images. The autoencoder is VA-VAE's structure at toy width (the reference
ddconfig of `tests/unit/test_ldm_vae.py`), so the store holds 16x16x4 latents of 32 px images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.export import export
from latentdiff.extract import run_extraction
from latentdiff.sample import run_sampling
from latentdiff.train import run_training

from ..artefacts import make_image_folder
from ..conftest import ROOT, compose_config, compose_entry, compose_extract
from ..helpers.reference import deterministic_state_dict

REFERENCE = json.loads((ROOT / "tests" / "data" / "ldm_vae_reference.json").read_text())


def _tiny_vavae(root: Path) -> list[str]:
    """vae=vavae_f16d32 at toy width: the checkpoint (LDM layout, with its loss's keys), statistics and ddconfig."""
    ckpt, stats = root / "vavae.pt", root / "latents_stats.pt"
    torch.save({"state_dict": {**deterministic_state_dict(REFERENCE["shapes"]), "loss.logvar": torch.zeros(())}}, ckpt)
    torch.save({"mean": torch.full((1, 4, 1, 1), 0.1), "std": torch.full((1, 4, 1, 1), 0.8)}, stats)
    ddconfig = REFERENCE["ddconfig"]
    ldm = [f"vae.ldm.{k}={json.dumps(v).replace(' ', '')}" for k, v in ddconfig.items() if k != "attn_resolutions"]
    return ["vae=vavae_f16d32", f"vae.pretrained={ckpt}", f"vae.latents_stats={stats}", *ldm,
            "vae.downsample_factor=2", "vae.latent_channels=4"]  # fmt: skip


def test_vavae_store_lightningdit_training_sampling_and_export(tmp_path):
    vae = _tiny_vavae(tmp_path)
    folder = make_image_folder(tmp_path / "images", per_class=3, corrupt=0)
    store = tmp_path / "store"
    extract = ["resolution=32", "shard_size=8", "batch_size=8", "num_workers=0", f"data.root={folder}", f"out={store}"]
    run_extraction(compose_extract([*vae, *extract]))
    model = ["model=lightningdit_b1", "model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
    data = ["data=latents", f"data.root={store}", "data.image_size=32", "data.num_classes=3", "data.batch_size=4"]
    data += ["data.num_workers=0", "data.pin_memory=false", "data.num_val=4"]
    run = [
        *vae, *model, *data, "diffusion=flow_lightningdit", "sampler=flow_euler", "sampler.steps=3",
        "trainer.precision=32-true", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.sample_grid.every_n_steps=0",
    ]  # fmt: skip
    result = run_training(compose_config(run, tmp_path))
    assert result["global_step"] == 2 and math.isfinite(result["metrics"]["val/loss_ema"])
    ckpt = Path(result["run_dir"]) / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["latentdiff"]["config"]
    assert stored["model"]["in_channels"] == 4 and stored["model"]["input_size"] == 16  # the vae's latents reshape it
    args = [f"ckpt={ckpt}", "num_samples=3", "labels=balanced", f"out={tmp_path / 'samples'}"]
    run_sampling(compose_entry("sample", args), args)
    npz = np.load(tmp_path / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (3, 32, 32, 3)
    export(ckpt, tmp_path / "export")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert pipe.vae.config.latents_mean == pytest.approx([0.1] * 4) and pipe.vae.config.latents_std == pytest.approx(
        [0.8] * 4
    )
    images = pipe(class_labels=npz["arr_1"].tolist(), seed=0, output_type="np").images
    assert np.array_equal(images, npz["arr_0"])
