"""End to end through `run_training`: one tiny run per backbone family, checkpoints, the autoencoder path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from latentdiff.errors import ConfigError
from latentdiff.models.build import build_backbone
from latentdiff.train import build_module, run_training

from ..conftest import TINY_RUN


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("uvit_tiny", []),
        ("unet_tiny", []),
        ("uvit_tiny", ["module.num_classes=0"]),
        ("dit_tiny", ["model.learn_sigma=true", "diffusion=linear", "sampler=ddpm_learned", "sampler.steps=2"]),
        ("dit_tiny", ["model.time_convention=sit", "diffusion=flow", "sampler=flow_sde", "sampler.steps=3"]),
        ("dit_tiny", [f"model.{switch}=true" for switch in ("swiglu", "rmsnorm", "rope", "qk_norm")]),
    ],
    ids=["uvit", "unet", "uvit-unconditional", "dit-learned-sigma", "sit", "lightningdit-switches"],
)
def test_one_run_per_backbone_family_writes_the_run_directory(compose_cfg, model, extra):
    cfg = compose_cfg([*TINY_RUN, f"model={model}", *extra])
    result = run_training(cfg)
    run = Path(result["run_dir"])
    assert result["global_step"] == 3
    for name in ("config.yaml", "last.ckpt", "metrics.csv", "loss_curve.png", "samples/step_0000003.png"):
        assert (run / name).is_file(), name
    rows = _rows(run / "metrics.csv")
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)


def test_checkpoint_holds_backbone_ema_optimizer_config_and_no_autoencoder(compose_cfg):
    cfg = compose_cfg(TINY_RUN)
    run = Path(run_training(cfg)["run_dir"])
    ckpt = torch.load(run / "last.ckpt", weights_only=True, map_location="cpu")  # safe loading works
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("ema.model.") for k in keys)
    assert not any(k.startswith("autoencoder.") for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 3
    assert ckpt["latentdiff"]["config"]["model"]["embed_dim"] == cfg.model.embed_dim
    assert torch.__version__.startswith(ckpt["latentdiff"]["versions"]["torch"])


def test_checkpoint_save_load_gives_the_same_outputs(compose_cfg):
    cfg = compose_cfg(TINY_RUN)
    run = Path(run_training(cfg)["run_dir"])
    ckpt = torch.load(run / "last.ckpt", weights_only=True, map_location="cpu")
    fresh = build_module(cfg)
    x = torch.randn(2, 3, 32, 32)
    t, y = torch.tensor([10, 700]), torch.tensor([0, 4])
    before = fresh.backbone(x, t, y)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: every key matches, the autoencoder is ignored
    assert not torch.allclose(before, fresh.backbone(x, t, y))
    # the loaded weights are the trained ones: compare with a second independent load
    other = build_module(cfg)
    other.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(fresh.backbone(x, t, y), other.backbone(x, t, y), rtol=0, atol=0)
    torch.testing.assert_close(fresh.ema.model(x, t, y), other.ema.model(x, t, y), rtol=0, atol=0)
    backbone_state = {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    raw = build_backbone(cfg.model)
    raw.load_state_dict(backbone_state)
    torch.testing.assert_close(raw(x, t, y), fresh.backbone(x, t, y), rtol=0, atol=0)


def test_latent_space_run_with_a_local_autoencoderkl(compose_cfg, tmp_path):
    vae_dir = tmp_path / "tiny_vae"
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(vae_dir)
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "vae=local",
            f"vae.pretrained={vae_dir}",
            "vae.downsample_factor=2",
            "vae.scaling_factor=0.5",
            "model.patch_size=2",
        ]
    )
    assert cfg.model.img_size == 16 and cfg.model.in_chans == 4
    run = Path(run_training(cfg)["run_dir"])
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert not any(k.startswith("autoencoder.") for k in ckpt["state_dict"])
    assert (run / "samples/step_0000003.png").is_file()  # decoded through the VAE


def test_missing_vae_names_what_to_download_and_the_option(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY_RUN, "vae=local", f"vae.pretrained={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"vae.pretrained=.*absent.*huggingface-cli download .* set vae.pretrained="):
        run_training(cfg)


def test_patch_size_must_divide_the_input(compose_cfg):
    cfg = compose_cfg([*TINY_RUN, "model.patch_size=3"])
    with pytest.raises(ConfigError, match=r"model.patch_size=3 does not divide"):
        run_training(cfg)
    assert not Path(cfg.paths.output_dir).exists()  # nothing written


def test_refuses_to_write_into_an_existing_run(compose_cfg):
    cfg = compose_cfg(TINY_RUN)
    run_training(cfg)
    mtime = (Path(cfg.paths.output_dir) / "last.ckpt").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(cfg)
    assert (Path(cfg.paths.output_dir) / "last.ckpt").stat().st_mtime_ns == mtime


def test_gradient_accumulation_and_bf16_run(compose_cfg):
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "trainer.accumulate_grad_batches=2",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
        ]
    )
    result = run_training(cfg)
    assert result["global_step"] == 2
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))


@pytest.mark.slow
def test_compiled_training_step(compose_cfg):
    cfg = compose_cfg([*TINY_RUN, "module.compile=true", "trainer.max_steps=2"])
    result = run_training(cfg)
    assert result["global_step"] == 2 and torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
