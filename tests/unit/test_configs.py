"""Every config in conf/ composes, resolves as before (golden file) and instantiates; bad values give one-line
errors naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from latentdiff.config import check_group_choices
from latentdiff.errors import ConfigError
from latentdiff.models.build import build_backbone
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.utils import native_bf16
from latentdiff.validation import validate_train_config

from ..conftest import CONF_DIR
from ..resolved_configs import (
    composer,
    first_difference,
    object_overrides,
    options,
    resolved,
)

# groups of conf/train.yaml (text_encoder belongs to conf/extract.yaml; sweep presets hold Hydra's sweeper settings)
GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "text_encoder", "sweep")
)
OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_first_difference_names_the_key_path():
    golden = {"model": {"_target_": "a.B", "depth": 12, "betas": [0.9, 0.99]}, "name": "x"}
    assert first_difference(golden, json.loads(json.dumps(golden))) is None
    assert first_difference(golden, {**golden, "name": "y"}) == "name: golden 'x', composed 'y'"
    changed = {**golden, "model": {**golden["model"], "betas": [0.9, 0.999]}}
    assert first_difference(golden, changed) == "model.betas[1]: golden 0.99, composed 0.999"
    assert first_difference(golden, {**golden, "model": {"_target_": "a.B", "depth": 12}}).startswith("model.betas")
    assert first_difference(golden, {**golden, "seed": 0}) == "seed: missing from the golden file"
    assert first_difference({"a": 1}, {"a": 1.0}) == "a: golden 1, composed 1.0"


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


def test_every_object_option_instantiates():
    for group, option in [o for o in OPTIONS if o[0] in ("model", "diffusion", "sampler")]:
        cfg = resolved("train", object_overrides(group, option))
        try:
            _check_instantiates(cfg, group, option)
        except AssertionError as err:
            raise AssertionError(f"{group}={option}: {err}") from err


def _check_instantiates(cfg, group: str, option: str) -> None:
    if option in ("masked_tokens", "amused"):  # the masked-token pieces go together
        objective = instantiate(cfg.diffusion)
        scheduler = make_sampling_scheduler(instantiate(cfg.sampler.scheduler), objective.scheduler)
        assert objective.mask_token_id == scheduler.config.mask_token_id == cfg.model.vocab_size - 1
    elif group == "model":
        with torch.device("meta"):
            model = build_backbone(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0
    elif group == "diffusion":
        diffusion = instantiate(cfg.diffusion)
        assert diffusion.num_timesteps == 1000
    else:
        train_scheduler = instantiate(cfg.diffusion).scheduler
        scheduler = make_sampling_scheduler(instantiate(cfg.sampler.scheduler), train_scheduler)
        if option.startswith("flow"):  # the flow samplers share the training timestep shift
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
    assert cfg.trainer.precision == fast
    assert cfg.diffusion._target_.endswith("FlowMatching") and cfg.diffusion.time_sampling == "logit_normal"
    assert cfg.sampler.scheduler._target_ == "diffusers.FlowMatchEulerDiscreteScheduler.from_config"
    assert (cfg.sampler.steps, cfg.sampler.guidance_scale) == (40, 5.0)


VALIDATION_ERRORS = {
    "optim.lr=-1e-4": "optim.lr=-0.0001 must be > 0",
    "module.p_uncond=1.0": "module.p_uncond=1.0 is outside [0, 1)",
    "module.p_uncond=-0.1": "module.p_uncond=-0.1 is outside [0, 1)",
    "data.batch_size=0": "data.batch_size=0 must be a positive integer",
    "trainer.max_steps=0": "trainer.max_steps=0 must be a positive integer",
    "trainer.precision=fp8": "trainer.precision='fp8' is not supported",
    "module.ema.decay=1.5": "module.ema.decay=1.5 must be in [0, 1)",
    "optim.lr=abc": "optim.lr='abc' must be a number",
}


def test_validation_names_key_value_and_allowed():
    with composer() as compose:
        for override, message in VALIDATION_ERRORS.items():
            cfg = compose([override])
            with pytest.raises(ConfigError) as err:
                validate_train_config(cfg)
            assert message in str(err.value) and "\n" not in str(err.value), override


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(
        ConfigError, match=r"model=uvit_xxl is not a known option of 'model'; use one of: uvit_l4, uvit_l2"
    ):
        check_group_choices(["model=uvit_xxl"], CONF_DIR)
    with pytest.raises(ConfigError, match=r"sampler=lms"):
        check_group_choices(["-m", "sampler=ddim,lms"], CONF_DIR)
    check_group_choices(["model=uvit_s2,uvit_tiny", "model.depth=3", "hydra/launcher=basic"], CONF_DIR)


def test_extraction_config_composes_with_each_text_encoder():
    for option in ("clip_vit_l14", "local"):
        cfg = resolved("extract", ["data=coco_captions", f"text_encoder={option}", "out=/x", "resolution=512"])
        assert cfg.data.resolution == 512 and cfg.text_encoder.max_length == 77
        assert cfg.text_encoder._target_ == "latentdiff.text.FrozenCLIPTextEncoder"


def test_latent_presets_shape_the_backbones():
    cfg = resolved("train", ["data=imagenet256_latents", "vae=sd_ema", "model=uvit_h2"])
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes) == (32, 4, 1001)
    cfg = resolved("train", ["data=imagenet512_latents", "vae=sd_ema", "model=uvit_h4_512"])
    assert cfg.model.img_size == 64
    cfg = resolved("train", ["data=coco256_latents", "vae=sd_ema", "model=uvit_s2_t2i"])
    assert (cfg.model.clip_dim, cfg.model.num_clip_token, cfg.data.num_classes) == (768, 77, 0)
    cfg = resolved("train", ["data=coco256_latents", "vae=sd_ema", "model=unet_cond"])
    assert cfg.model.cross_attention_dim == 768


def test_the_early_check_resolves_references_and_leaves_computed_values_to_the_job(compose_cfg):
    from latentdiff.validation import check_early

    # lists holding references are resolved before their rule is read: valid commands are not refused
    check_early(compose_cfg(["sampler.guidance_interval=[0,${diffusion.scheduler.num_train_timesteps}]"]), "train")
    check_early(compose_cfg(["optim.betas=[0.9,${optim.weight_decay}]"]), "train")
    with pytest.raises(ConfigError, match=r"^optim.betas=\[0.9, 2.0\] must be a pair"):
        check_early(compose_cfg(["optim.betas=[0.9,${optim.weight_decay}]", "optim.weight_decay=2.0"]), "train")
    # data.latent_size is computed by a resolver (ld.div): neither it nor model.img_size, which refers to it, is
    # checked early; the job names data.latent_size, the key computed
    check_early(compose_cfg(["vae.downsample_factor=64"]), "train")
    with pytest.raises(ConfigError, match=r"^data.image_size=-32 must be a positive integer"):
        check_early(compose_cfg(["data.image_size=-32"]), "train")  # the data's own key, before the model's
