"""How a KL autoencoder's latents `z` become the backbone's: the scaling factor (SD: 0.18215), and optionally
channel-wise statistics (LightningDiT normalises VA-VAE's latents by their per-channel mean and std,
`latents_stats.pt`). `autoencoder.FrozenAutoencoderKL` and an export's pipeline (`pipeline.py`) both use these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentdiff.checkpoint import read_torch_file


def model_latents(z: torch.Tensor, scaling_factor: float, shift: Any = 0.0, scale: Any = 1.0) -> torch.Tensor:
    """The backbone's latents of an AutoencoderKL's `z`: `(z - shift) / scale * scaling_factor`."""
    return scaling_factor * (z - shift) / scale


def vae_latents(latents: torch.Tensor, scaling_factor: float, shift: Any = 0.0, scale: Any = 1.0) -> torch.Tensor:
    """The AutoencoderKL's `z` of the backbone's latents (the inverse of `model_latents`)."""
    return latents / scaling_factor * scale + shift


def read_latents_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel-wise (1, C, 1, 1) mean and std in a latents_stats file (read with `weights_only=True`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"vae.latents_stats={path} does not exist; download the autoencoder's latent statistics (VA-VAE: "
            "latents_stats.pt of huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2), set vae.latents_stats=<file>"
        )
    stats = read_torch_file(path, "vae.latents_stats", what="latent statistics file")
    try:
        mean, std = (stats[k].float().reshape(1, channels, 1, 1) for k in ("mean", "std"))
    except (TypeError, KeyError, RuntimeError, AttributeError):
        raise ValueError(
            f"vae.latents_stats={path} must hold 'mean' and 'std' tensors of {channels} values (one per channel)"
        ) from None
    return mean, std
