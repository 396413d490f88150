"""Every config in conf/ composes and instantiates; bad values give one-line errors naming the key."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from latentdiff.config import check_group_choices
from latentdiff.errors import ConfigError
from latentdiff.models import build_backbone
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.utils import native_bf16
from latentdiff.validation import validate_train_config

from .conftest import CONF_DIR

# groups of conf/train.yaml (text_encoder belongs to conf/extract.yaml)
# (sweep presets hold Hydra's sweeper settings: test_every_sweep_preset_composes_and_builds_each_job)
GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "text_encoder", "sweep")
)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# options that need an artefact a user supplies (a VAE folder), composed but not instantiated here
EXTRACTION_SOURCES = ("imagenet_folder", "coco_captions")  # data options of conf/extract.yaml
NEEDS_ARTEFACT = {("vae", "sd_ema"), ("vae", "sd_mse"), ("vae", "local")}


def test_groups_mirror_the_package():
    expected = {
        "model",
        "data",
        "vae",
        "diffusion",
        "sampler",
        "optim",
        "module",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
    }
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(compose_cfg, group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("vae", "local"):
        overrides.append("vae.pretrained=/some/dir")
    if group == "data" and option.endswith("_latents"):
        overrides += ["vae=sd_ema", "model=uvit_s2_t2i" if "coco" in option else "model=uvit_l2"]
    if group == "vae" and option != "none":
        overrides += ["model=uvit_tiny", "model.patch_size=2"]  # 256 px / 8 = 32 latents would need image_size 256
        overrides.append("data.image_size=256")
    if group == "data" and option in EXTRACTION_SOURCES:
        from .test_latents import compose_extract

        cfg = compose_extract([*overrides, "out=/x"])  # a source composes with conf/extract.yaml
    else:
        cfg = compose_cfg(overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container[group if group != "experiment" else "name"] is not None


@pytest.mark.parametrize(("group", "option"), [o for o in OPTIONS if o[0] in ("model", "diffusion", "sampler")])
def test_every_object_option_instantiates(compose_cfg, group, option):
    tokens = option in ("uvit2d", "uvit2d_tiny", "masked_tokens", "amused")  # the masked-token pieces go together
    cfg = compose_cfg([*(["experiment=quickstart_tokens"] if tokens else []), f"{group}={option}"])
    if tokens and group != "model":
        objective = instantiate(cfg.diffusion)
        scheduler = make_sampling_scheduler(instantiate(cfg.sampler.scheduler), objective.scheduler)
        assert objective.mask_token_id == scheduler.config.mask_token_id == cfg.model.vocab_size - 1
        return
    if group == "model":
        if "t2i" in option or option.startswith("unet_cond"):
            cfg = compose_cfg([f"{group}={option}", "data.num_classes=0"])
        with torch.device("meta"):
            model = build_backbone(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0
    elif group == "diffusion":
        diffusion = instantiate(cfg.diffusion)
        assert diffusion.num_timesteps == 1000
    else:
        flow = option.startswith("flow")
        if flow:
            cfg = compose_cfg([f"{group}={option}", "diffusion=flow"])
        train_scheduler = instantiate(cfg.diffusion).scheduler
        scheduler = make_sampling_scheduler(instantiate(cfg.sampler.scheduler), train_scheduler)
        if flow:  # the flow samplers share the training timestep shift
            assert scheduler.config.shift == train_scheduler.config.shift
        else:  # the sampler shares the training schedule (same betas)
            assert torch.equal(scheduler.betas, train_scheduler.betas)


def test_data_reshapes_the_backbone(compose_cfg):
    cfg = compose_cfg(["data.image_size=64", "data.num_classes=6", "model=uvit_s4"])
    assert cfg.model.img_size == 64 and cfg.model.in_chans == 3 and cfg.model.num_classes == 7
    cfg = compose_cfg(["data.image_size=256", "vae=sd_ema", "model=uvit_l2"])
    assert cfg.model.img_size == 32 and cfg.model.in_chans == 4


def test_default_is_the_quickstart(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.name == "quickstart"
    assert cfg.model._target_ == "latentdiff.models.uvit.UViT" and cfg.vae._target_.endswith("IdentityAutoencoder")
    fast = "bf16-mixed" if native_bf16() else "32-true"  # bf16 only where this machine computes it natively
    assert cfg.trainer.precision == fast and cfg.diffusion.scheduler.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1e-4", "optim.lr=-0.0001 must be > 0"),
        ("module.p_uncond=1.0", "module.p_uncond=1.0 is outside [0, 1)"),
        ("module.p_uncond=-0.1", "module.p_uncond=-0.1 is outside [0, 1)"),
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a positive integer"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not supported"),
        ("module.ema.decay=1.5", "module.ema.decay=1.5 must be in [0, 1)"),
        ("optim.lr=abc", "optim.lr='abc' must be a number"),
    ],
)
def test_validation_names_key_value_and_allowed(compose_cfg, override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match=r"model=uvit_xxl is not a known option of 'model'; use one of: .*uvit_tiny"):
        check_group_choices(["model=uvit_xxl"], CONF_DIR)
    with pytest.raises(ConfigError, match=r"sampler=lms"):
        check_group_choices(["-m", "sampler=ddim,lms"], CONF_DIR)
    check_group_choices(["model=uvit_s2,uvit_tiny", "model.depth=3", "hydra/launcher=basic"], CONF_DIR)


@pytest.mark.parametrize("option", ["clip_vit_l14", "local"])
def test_extraction_config_composes_with_each_text_encoder(option):
    from .test_latents import compose_extract

    cfg = compose_extract(["data=coco_captions", f"text_encoder={option}", "out=/x", "resolution=512"])
    assert cfg.data.resolution == 512 and cfg.text_encoder.max_length == 77
    assert cfg.text_encoder._target_ == "latentdiff.text.FrozenCLIPTextEncoder"


def test_latent_presets_shape_the_backbones(compose_cfg):
    cfg = compose_cfg(["data=imagenet256_latents", "vae=sd_ema", "model=uvit_h2"])
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes) == (32, 4, 1001)
    cfg = compose_cfg(["data=imagenet512_latents", "vae=sd_ema", "model=uvit_h4_512"])
    assert cfg.model.img_size == 64
    cfg = compose_cfg(["data=coco256_latents", "vae=sd_ema", "model=uvit_s2_t2i"])
    assert (cfg.model.clip_dim, cfg.model.num_clip_token, cfg.data.num_classes) == (768, 77, 0)
    cfg = compose_cfg(["data=coco256_latents", "vae=sd_ema", "model=unet_cond"])
    assert cfg.model.cross_attention_dim == 768


SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes_and_builds_each_job(sweep):
    """A sweep preset is a multirun whose every job composes and builds its backbone (the ablation values are
    ones the U-ViT accepts); the Optuna preset's search space parses."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .conftest import compose_config

    base = ["experiment=cifar10_uvit_s2", f"sweep={sweep}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=base, return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    if sweep.startswith("optuna"):
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.objective == "val/loss_ema"
        return
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    jobs = [list(j) for j in itertools.product(*axes)]
    assert len(jobs) >= 2
    for job in jobs:
        job_cfg = compose_config(["experiment=cifar10_uvit_s2", *job])
        with torch.device("meta"):
            model = build_backbone(job_cfg.model)
        for override in job:
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(job_cfg, key)) == value
        assert sum(p.numel() for p in model.parameters()) > 0
