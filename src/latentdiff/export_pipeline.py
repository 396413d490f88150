"""The diffusers pipeline an export folder claims (its `model_index.json`) and the components it loads.

- A DiT that diffusers' `DiTTransformer2DModel` holds, with ImageNet's 1000 classes (`DiTPipeline` guides with the
  null class 1000), trained with the Gaussian objective on an `AutoencoderKL`'s latents: diffusers' own
  `DiTPipeline` (`transformer/`, `vae/`, `scheduler/`: the run's sampler, its variance fixed, since `DiTPipeline`
  drops learned variance channels). No custom code; the outputs are diffusers' DiT's,
  whose time frequencies differ from the official DiT's (`models.dit_diffusers`).
- Every other class-conditional or unconditional run: `pipeline.LatentdiffPipeline`, shipped as a one-line file
  (`trust_remote_code=True`), over the backbone (a diffusers UNet where it is one, else `LatentdiffBackbone`),
  the training schedule, the run's `AutoencoderKL` and the sampler's config: it draws what `sample.py` draws.
- Text-conditional and VQ-token runs: no pipeline claim (no `model_index.json`): their condition (a text encoder,
  the class tables of the token model) is not in the folder. Their backbone folder and `backbone.safetensors`
  are written all the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import diffusers

from latentdiff.errors import ConfigError
from latentdiff.models.contract import Backbone
from latentdiff.models.dit import DiT
from latentdiff.models.dit_diffusers import diffusers_problem, save_transformer
from latentdiff.objectives import objective_for
from latentdiff.objectives.gaussian import GaussianDiffusion
from latentdiff.pipeline import ship_pipeline_code
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.trust import build

log = logging.getLogger(__name__)

_KL = "latentdiff.autoencoder.FrozenAutoencoderKL"


def no_pipeline(backbone: Backbone, config: dict[str, Any]) -> str | None:
    """Why an export of this run claims no diffusers pipeline; None when it claims one."""
    if backbone.input_kind == "tokens":
        return "a VQ-token run (its class tables are only in backbone.safetensors)"
    if backbone.condition == "text":
        return "a text-conditional run (its text encoder is not exported)"
    vae = (config.get("vae") or {}).get("_target_")
    if vae not in (_KL, "latentdiff.autoencoder.IdentityAutoencoder"):
        return f"vae._target_={vae} (the pipelines decode with an AutoencoderKL or none)"
    return None


def dit_pipeline_problem(
    backbone: Backbone, model_cfg: dict[str, Any], config: dict[str, Any], train: Any, sampler: Any
) -> str | None:
    """Why diffusers' `DiTPipeline` cannot hold this run (`sampler`: its sampling scheduler); None when it can."""
    if not isinstance(backbone, DiT):
        return f"{type(backbone).__name__} is not a DiT"
    problem = diffusers_problem(model_cfg)
    if problem is None and int(model_cfg.get("num_classes", 1000)) != 1000:
        problem = f"num_classes={model_cfg.get('num_classes')} (DiTPipeline's null class is ImageNet's, 1000)"
    vae = config.get("vae") or {}
    if problem is None and (vae.get("_target_") != _KL or vae.get("latents_stats")):
        problem = "no AutoencoderKL with a scalar scaling factor (what DiTPipeline decodes with)"
    if problem is None and objective_for(train) is not GaussianDiffusion:
        problem = "a flow objective (DiTPipeline steps a DDPM-family scheduler)"
    if problem is None and float(getattr(sampler, "init_noise_sigma", 1.0)) != 1.0:
        sigma = float(sampler.init_noise_sigma)
        problem = f"{type(sampler).__name__} starts from noise of std {sigma:g} (DiTPipeline draws std 1)"
    return problem


def write_pipeline(
    tmp: Path, backbone: Backbone, model_cfg: dict[str, Any], config: dict[str, Any], where: str
) -> None:
    """Write the pipeline's components and `model_index.json` into the export folder `tmp` (see the module
    docstring); a run without one gets its backbone folder only."""
    diffusion = config.get("diffusion") or {}
    if not isinstance(diffusion.get("scheduler"), dict):
        raise ConfigError(f"{where}: the stored config has no diffusion.scheduler; it is not a latentdiff run")
    train = build(diffusion["scheduler"], where, "diffusion.scheduler")
    folder = backbone.export_folder
    reason, autoencoder = no_pipeline(backbone, config), None
    if reason is None and config["vae"]["_target_"] == _KL:
        try:  # the pipeline ships the run's autoencoder: it must load here
            autoencoder = build(config["vae"], where, "vae")
        except (ConfigError, OSError, ValueError) as err:
            reason = f"vae.pretrained={config['vae'].get('pretrained')} does not load here ({str(err).splitlines()[0]})"
    if reason is not None:
        backbone.save_diffusers(tmp / folder, model_cfg)
        train.save_pretrained(tmp / "scheduler")
        log.warning("no diffusers pipeline in the export: %s", reason)
        return
    index: dict[str, Any] = {"_class_name": None, "_diffusers_version": diffusers.__version__}  # filled below
    if autoencoder is not None:
        index["vae"] = ["diffusers", _save_vae(tmp / "vae", autoencoder, config["vae"])]
    sampler = make_sampling_scheduler(build(config["sampler"]["scheduler"], where, "sampler.scheduler"), train)
    if dit_pipeline_problem(backbone, model_cfg, config, train, sampler) is None:
        save_transformer(backbone.state_dict(), model_cfg, tmp / "transformer")
        if "variance_type" in sampler.config and str(sampler.config.variance_type).startswith("learned"):
            sampler.register_to_config(variance_type="fixed_small")
        sampler.save_pretrained(tmp / "scheduler")
        index.update(_class_name="DiTPipeline", transformer=["diffusers", "DiTTransformer2DModel"])
        index["scheduler"] = ["diffusers", type(sampler).__name__]
    else:
        index[folder] = list(backbone.save_diffusers(tmp / folder, model_cfg))
        train.save_pretrained(tmp / "scheduler")
        index.update(scheduler=["diffusers", type(train).__name__], sampling=_sampling(model_cfg, config))
        ship_pipeline_code(tmp, index)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))


def _save_vae(folder: Path, autoencoder: Any, vae_cfg: dict[str, Any]) -> str:
    """The run's AutoencoderKL (`autoencoder.FrozenAutoencoderKL`) as a diffusers folder whose `scaling_factor` (and
    `latents_mean`, `latents_std`: the channel-wise statistics of `vae.latents_stats`) are the run's."""
    autoencoder.vae.register_to_config(scaling_factor=autoencoder.scaling_factor)
    mean = std = None  # a hub config's own statistics are not the run's: the run decodes without them
    if vae_cfg.get("latents_stats"):
        mean, std = (t.flatten().tolist() for t in (autoencoder.shift, autoencoder.scale))
    autoencoder.vae.register_to_config(latents_mean=mean, latents_std=std)
    autoencoder.vae.save_pretrained(folder, safe_serialization=True)
    return type(autoencoder.vae).__name__


def _sampling(model_cfg: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What `LatentdiffPipeline` needs of the run beside its components (`model_index.json`'s `sampling`)."""
    data, module = config["data"], config.get("module") or {}
    record = {
        "model": model_cfg,
        "sampler": config["sampler"],
        "latent_shape": [int(data["latent_channels"]), int(data["latent_size"]), int(data["latent_size"])],
        "num_classes": int(module.get("num_classes") or 0),
    }
    if config["vae"]["_target_"] != _KL:
        record["vae"] = config["vae"]
    return record
