"""Experiment presets (`conf/experiment/*.yaml`).

- The paper rows carry the official U-ViT hyper-parameters: `GOLDEN` holds them, copied from the official
  repository's `configs/*.py` (github.com/baofff/U-ViT), so a preset that drifts from its row fails here.
- Every preset (found by glob, so a new file is covered) trains one step on CPU at toy width, on a tiny store
  made by the real extraction code (a tiny VAE for latent rows, `vae=none` for pixel rows, a tiny CLIP for
  COCO), each store built once per module.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from latentdiff.extract import run_extraction
from latentdiff.train import run_training

from ..artefacts import (
    TINY_VAE_FACTOR,
    TINY_VQ_CODES,
    TINY_VQ_FACTOR,
    make_coco,
    make_image_folder,
    make_tiny_clip,
    make_tiny_vae,
    make_tiny_vq,
)
from ..conftest import compose_config, compose_extract
from ..helpers.experiments import EXPERIMENTS, PIXELS, UNET_COND, UVIT
from ..resolved_configs import resolved


# ------------------------------------------------------------------------------------ one step per preset
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """store(kind, resolution, scaling_factor) -> path of a tiny store, extracted on first use.

    kind: "labels" (tiny VAE, 3 classes), "pixels" (vae=none, 3 classes) or "text" (tiny VAE and CLIP).
    """
    root = tmp_path_factory.mktemp("experiment_stores")
    art = {"vae": make_tiny_vae(root / "vae"), "clip": make_tiny_clip(root / "clip"), "vq": make_tiny_vq(root / "vq")}
    art["folder"] = make_image_folder(root / "images", per_class=4, corrupt=0)
    art["coco"] = make_coco(root / "coco", count=8)
    made: dict[tuple, Path] = {}

    def store(kind: str, resolution: int, scaling_factor: float | None) -> Path:
        key = (kind, resolution, scaling_factor)
        if key not in made:
            out = root / f"{kind}_{resolution}_{scaling_factor}"
            args = [f"resolution={resolution}", "shard_size=8", "batch_size=8", "num_workers=0", f"out={out}"]
            if kind == "pixels":
                args += ["vae=none", "vae.channels=3"]
            elif kind == "tokens":
                args += _tiny_vq(art["vq"])
            else:
                args += [f"vae.pretrained={art['vae']}", f"vae.downsample_factor={TINY_VAE_FACTOR}"]
                if scaling_factor is not None:
                    args.append(f"vae.scaling_factor={scaling_factor}")
            if kind == "text":
                images, annotations = art["coco"]
                args += ["data=coco_captions", f"data.images={images}", f"data.annotations={annotations}"]
                args += ["text_encoder=local", f"text_encoder.pretrained={art['clip']}"]
            else:
                args.append(f"data.root={art['folder']}")
            run_extraction(compose_extract(args))
            made[key] = out
        return made[key]

    store.vae, store.vq = art["vae"], art["vq"]
    return store


def _tiny_vq(path: Path) -> list[str]:
    """The overrides that put the tiny VQModel in place of a preset's VQ-GAN."""
    return [
        "vae=vq_local",
        f"vae.pretrained={path}",
        f"vae.codebook_size={TINY_VQ_CODES}",
        f"vae.downsample_factor={TINY_VQ_FACTOR}",
        "vae.latent_channels=4",
    ]


def _toy_model(model) -> list[str]:
    """Toy-width overrides of a preset's backbone (its layout, depth pattern and options kept)."""
    if model._target_ == UVIT:
        return ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
    if model._target_.endswith(".DiT"):
        return ["model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
    if model._target_.endswith("UVit2D"):  # its layout (down/upsampling, conditioning) kept
        return [
            "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.in_channels=16", "model.block_out_channels=16", "model.block_num_heads=2",
            "model.num_res_blocks=1", "model.intermediate_size=64", "model.micro_cond_encode_dim=4",
            "model.micro_cond_embed_dim=20",
        ]  # fmt: skip
    levels = ",".join(["32"] * len(model.block_out_channels))
    heads = "model.attention_head_dim=" + ("2" if model._target_ == UNET_COND else "8")  # heads | channels per head
    return [f"model.block_out_channels=[{levels}]", "model.norm_num_groups=8", "model.layers_per_block=1", heads]


def _toy_data(cfg, stores) -> list[str]:
    """A tiny store of the preset's kind (latents, pixels or text) and the data keys that must follow it."""
    if not cfg.data._target_.endswith("LatentDataModule"):  # built-in data (the quickstart's shapes)
        return ["data.num_train=32", "data.num_val=8", "data.num_workers=0"]
    text, pixels = bool(cfg.data.text), cfg.vae._target_ == PIXELS
    if cfg.vae._target_.endswith("FrozenVQModel"):  # a token store of the tiny VQModel (8x8 ids)
        overrides = ["data.image_size=32", *_tiny_vq(stores.vq)]
        root = stores("tokens", 32, None)
        return [*overrides, f"data.root={root}", "data.num_workers=0", "data.pin_memory=false", "data.num_val=4",
                "data.num_classes=3"]  # fmt: skip
    if pixels:
        resolution, scaling = cfg.data.image_size, None  # the pixel rows' own sizes (32, 64)
        overrides = []
    else:
        resolution, scaling = 32, cfg.vae.get("scaling_factor")  # 8x8x4 latents of the tiny VAE
        overrides = ["data.image_size=32", f"vae.pretrained={stores.vae}", f"vae.downsample_factor={TINY_VAE_FACTOR}"]
        if cfg.vae.get("ldm"):  # VA-VAE (an LDM-layout file; tests/integration/test_vavae.py): the tiny diffusers VAE
            overrides += ["vae.ldm=null", "vae.latents_stats=null", "vae.latent_channels=4"]
    root = stores("text" if text else "pixels" if pixels else "labels", resolution, scaling)
    overrides += [f"data.root={root}", "data.num_workers=0", "data.pin_memory=false", "data.num_val=4"]
    if text:
        overrides.append("data.text_dim=32")  # the tiny CLIP's width
    elif cfg.data.num_classes > 0:
        overrides.append("data.num_classes=3")  # the tiny image folder's classes
    return overrides


ONE_STEP = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=4",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.loss_curve=null",
    "callbacks.lr_monitor=null",
    "sampler.steps=2",  # the grid at the end samples with the preset's sampler and guidance
    "callbacks.sample_grid.samples_per_class=1",
    "callbacks.sample_grid.max_classes=2",
    "callbacks.sample_grid.num_samples=2",
]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_trains_one_step(name, stores, tmp_path):
    preset = resolved("train", [f"experiment={name}"])
    overrides = [f"experiment={name}", *ONE_STEP, "trainer.precision=32-true"]
    overrides += [*_toy_model(preset.model), *_toy_data(preset, stores)]
    result = run_training(compose_config(overrides, tmp_path))
    assert result["global_step"] == 1 and math.isfinite(result["metrics"]["train/loss"])
    run = Path(result["run_dir"])
    assert (run / "last.ckpt").is_file() and (run / "samples/step_0000001.png").is_file()
