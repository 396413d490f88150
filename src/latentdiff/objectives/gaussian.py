"""Discrete-time Gaussian diffusion on a diffusers `DDPMScheduler`: training targets and loss weighting.

The schedule itself (betas, alpha_bar, `add_noise`, `get_velocity`) always comes from the scheduler; this module
only writes what diffusers leaves to the training script.

Glossary (DDPM notation, discrete t in [0, N)):
    x0        clean latent (B, C, h, w)
    eps       standard normal noise, same shape
    t         integer timesteps (B,), diffusers convention (0 = least noisy)
    alpha_bar cumulative product of (1 - beta) at t
    x_t       sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps        (scheduler.add_noise)
    v         sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0        (scheduler.get_velocity)
    snr       alpha_bar / (1 - alpha_bar)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler

from latentdiff.objectives.base import DenoisingObjective, takes_argument
from latentdiff.objectives.variance import LearnedVariance

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("none", "min_snr")


class GaussianDiffusion(DenoisingObjective):
    """Training objective for a discrete-time Gaussian diffusion defined by a diffusers `DDPMScheduler`.

    Args:
        scheduler: the training schedule; its `prediction_type` picks the target (eps, v or x0).
        loss_weighting: "none" (plain MSE on the target) or "min_snr" (Hang et al. 2023, min-SNR-gamma).
        min_snr_gamma: gamma of min-SNR weighting.
    """

    kind = "Gaussian diffusion"
    scheduler_class = DDPMScheduler

    def __init__(self, scheduler: DDPMScheduler, loss_weighting: str = "none", min_snr_gamma: float = 5.0):
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"diffusion.scheduler.prediction_type={prediction_type!r} is not supported; "
                f"use one of {', '.join(PREDICTION_TYPES)}"
            )
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"diffusion.loss_weighting={loss_weighting!r} is not supported; use one of {', '.join(LOSS_WEIGHTINGS)}"
            )
        if min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma={min_snr_gamma} must be > 0")
        if scheduler.config.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
            raise ValueError(
                "diffusion.scheduler.rescale_betas_zero_snr=true needs prediction_type=v_prediction or sample: "
                "at zero terminal SNR an epsilon prediction says nothing about x0 (Lin et al. 2024)"
            )
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.variance = LearnedVariance(scheduler, prediction_type)

    @classmethod
    def takes_sampler(cls, scheduler_class: type) -> bool:
        """The samplers that follow a beta schedule (DDPM, DDIM, DPM-Solver, Euler, Heun, ...)."""
        return takes_argument(scheduler_class, "beta_schedule")

    @classmethod
    def sampler_problem(cls, scheduler_class: type, train_config: Mapping[str, Any]) -> str | None:
        """As `Objective.sampler_problem`; a zero-terminal-SNR schedule also needs a sampler that rescales it."""
        problem = super().sampler_problem(scheduler_class, train_config)
        zero_snr = bool(train_config.get("rescale_betas_zero_snr"))
        if problem is None and zero_snr and not takes_argument(scheduler_class, "rescale_betas_zero_snr"):
            return "cannot follow the zero-terminal-SNR schedule (diffusion.scheduler.rescale_betas_zero_snr=true)"
        return problem

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t (B,)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        return alpha_bar / (1.0 - alpha_bar)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the backbone learns to predict, per `prediction_type`."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        return x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,); min-SNR-gamma expressed for the chosen target (Hang et al. 2023, eq. 7-9)."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform integer timesteps (B,) in [0, N)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (the scheduler's `add_noise`)."""
        return self.scheduler.add_noise(x0, eps, t)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The integer timesteps themselves."""
        return t

    def variance_loss(
        self, pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The hybrid loss's L_vb (B,): the bound's term at t with the prediction frozen (`objectives.variance`)."""
        return self.variance.vb_term(pred, v, x0, x_t, t)
