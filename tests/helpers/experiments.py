"""Experiment presets (`conf/experiment/*.yaml`), found by glob, and the targets their resolved configs name."""

from __future__ import annotations

from ..conftest import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

UVIT = "latentdiff.models.uvit.UViT"
UNET = "latentdiff.models.unet.UNet"
UNET_COND = "latentdiff.models.unet.UNetCond"
SD_VAE = "latentdiff.autoencoder.FrozenAutoencoderKL"
PIXELS = "latentdiff.autoencoder.IdentityAutoencoder"
DPM_SINGLESTEP = "diffusers.DPMSolverSinglestepScheduler.from_config"
DDPM = "diffusers.DDPMScheduler.from_config"
