"""Exports of latent runs as diffusers pipelines: a DiT that diffusers holds becomes diffusers' own `DiTPipeline`
(no custom code); any other backbone becomes `LatentdiffPipeline`, which draws what `sample.py` draws through the
exported `AutoencoderKL`. (Pixel-space runs and the UNet: `tests/e2e/test_reliability.py`.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DiTPipeline

from latentdiff.export import export
from latentdiff.models.build import build_backbone
from latentdiff.sample import run_sampling
from latentdiff.train import run_training

from ..artefacts import make_tiny_vae
from ..conftest import TINY_RUN, compose_config, compose_entry


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipelines")
    return Path(run_training(compose_config(TINY_RUN, root))["run_dir"]) / "last.ckpt"


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def _latent_dit_run(
    real_ckpt: Path, vae: Path, path: Path, stats: Path | None = None, sampler: str | None = None, **options
) -> tuple[Path, torch.nn.Module]:
    """The tiny run's checkpoint made a DiT on the tiny VAE's 8x8x4 latents (scaling factor 0.5; `stats`: latents
    normalised per channel)."""
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    config = ckpt["latentdiff"]["config"]
    model_cfg = {
        "_target_": "latentdiff.models.dit.DiT",
        **dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, learn_sigma=False),
        "num_classes": int(config["module"]["num_classes"]),
        **options,
    }
    torch.manual_seed(0)
    dit = build_backbone(model_cfg).eval()
    with torch.no_grad():  # away from adaLN-Zero's identity start
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config["model"] = model_cfg
    config["vae"] = {"_target_": "latentdiff.autoencoder.FrozenAutoencoderKL", "pretrained": str(vae)}
    config["vae"] |= {"scaling_factor": 0.5, "downsample_factor": 4, "latent_channels": 4}
    if stats is not None:
        config["vae"]["latents_stats"] = str(stats)
    if sampler is not None:
        config["sampler"]["scheduler"] = {"_target_": f"diffusers.{sampler}.from_config", "_partial_": True}
    config["data"] |= {"latent_channels": 4, "latent_size": 8, "image_size": 32}
    ckpt["state_dict"] = {f"ema.model.{k}": v for k, v in dit.state_dict().items()}
    torch.save(ckpt, path)
    return path, dit


def test_a_dit_diffusers_holds_exports_as_diffusers_dit_pipeline(real_ckpt, vae, tmp_path):
    ckpt, dit = _latent_dit_run(real_ckpt, vae, tmp_path / "dit.ckpt", num_classes=1000)
    out = tmp_path / "export"
    export(ckpt, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert not list(out.rglob("*.py"))  # diffusers' own classes: no code to trust
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DiTPipeline) and pipe.vae.config.scaling_factor == 0.5
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([0, 2])
    for block in pipe.transformer.transformer_blocks:  # DiT's time frequencies (/128, not diffusers' /127)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    with torch.no_grad():
        theirs = pipe.transformer(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(theirs, dit(x, t, y), rtol=1e-5, atol=1e-5)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("stats", [False, True], ids=["scaling-factor", "channel-statistics"])
def test_another_backbone_on_latents_exports_as_latentdiff_pipeline_with_sample_py_images(
    real_ckpt, vae, tmp_path, stats
):
    latents_stats = tmp_path / "latents_stats.pt" if stats else None
    if stats:  # LightningDiT's latent normalisation (vae=vavae_f16d32): per-channel mean and std
        torch.save(
            {"mean": torch.tensor([0.3, -0.2, 0.1, 0.0]), "std": torch.tensor([2.0, 0.5, 1.5, 1.0])}, latents_stats
        )
    else:  # a hub VAE whose config carries statistics that the run does not use (FrozenAutoencoderKL ignores them)
        vae = Path(shutil.copytree(vae, tmp_path / "vae_with_stats"))
        config = json.loads((vae / "config.json").read_text())
        config |= {"latents_mean": [0.5, 0.5, 0.5, 0.5], "latents_std": [3.0, 3.0, 3.0, 3.0]}
        (vae / "config.json").write_text(json.dumps(config))
    ckpt, _ = _latent_dit_run(real_ckpt, vae, tmp_path / "lightningdit.ckpt", latents_stats, swiglu=True, rmsnorm=True)
    out = tmp_path / "export"
    export(ckpt, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latentdiff", "LatentdiffPipeline"]  # diffusers has no LightningDiT
    assert index["transformer"] == ["latentdiff_backbone", "LatentdiffBackbone"]
    args = [f"ckpt={ckpt}", "num_samples=3", "labels=balanced", f"out={tmp_path / 'samples'}"]
    run_sampling(compose_entry("sample", args), args)
    npz = np.load(tmp_path / "samples" / "samples.npz")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert pipe.vae.config.scaling_factor == 0.5
    assert pipe.vae.config.latents_std == ([2.0, 0.5, 1.5, 1.0] if stats else None)
    images = pipe(class_labels=npz["arr_1"].tolist(), seed=0, output_type="np").images
    assert np.array_equal(images, npz["arr_0"])
    with pytest.raises(ValueError, match=r"class_labels must be ids in \[0, "):
        pipe(class_labels=[99])
    with pytest.raises(ValueError, match=r"^output_type='latent': use 'pil', 'np' or 'pt'$"):
        pipe(class_labels=[0], output_type="latent")


def test_a_dit_whose_sampler_starts_from_wider_noise_gets_latentdiff_pipeline(real_ckpt, vae, tmp_path):
    """DiTPipeline draws unit noise and never scales it by `init_noise_sigma`: an Euler run is not DiTPipeline's."""
    ckpt, _ = _latent_dit_run(
        real_ckpt, vae, tmp_path / "euler.ckpt", sampler="EulerDiscreteScheduler", num_classes=1000
    )
    export(ckpt, tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latentdiff", "LatentdiffPipeline"]


def test_an_export_without_its_autoencoder_claims_no_pipeline(real_ckpt, vae, tmp_path, caplog):
    ckpt, dit = _latent_dit_run(real_ckpt, tmp_path / "moved_away", tmp_path / "dit.ckpt", num_classes=1000)
    export(ckpt, tmp_path / "export")
    assert not (tmp_path / "export" / "model_index.json").exists()
    assert "no diffusers pipeline in the export: vae.pretrained=" in caplog.text and "does not load here" in caplog.text
    from latentdiff.export import load_exported

    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "export")(x, t, y), dit(x, t, y))  # the weights are there


def test_a_saved_pipeline_loads_again_and_half_weights_are_refused(real_ckpt, vae, tmp_path):
    ckpt, _ = _latent_dit_run(real_ckpt, vae, tmp_path / "lightningdit.ckpt", swiglu=True)
    export(ckpt, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export", trust_remote_code=True)
    first = pipe(class_labels=[0, 1], seed=3, output_type="np").images
    pipe.save_pretrained(tmp_path / "again")
    again = DiffusionPipeline.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert type(again).__name__ == "LatentdiffPipeline"
    assert np.array_equal(again(class_labels=[0, 1], seed=3, output_type="np").images, first)
    half = again.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"samples float32 weights \(got torch\.bfloat16\)"):
        half(class_labels=[0])
