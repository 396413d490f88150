"""Rectified flow (Liu et al. 2023; Esser et al. 2024) on diffusers' `FlowMatchEulerDiscreteScheduler`.

Glossary:
    x0    clean latent (B, C, h, w)
    eps   standard normal noise, same shape
    t     noise level in [0, 1] (B,)
    x_t   (1 - t) x0 + t eps
    v     the velocity d x_t / d t = eps - x0 (the target)
The backbone sees t * num_train_timesteps, the timesteps of diffusers' FlowMatch* schedulers.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from latentdiff.objectives.base import DenoisingObjective

FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching(DenoisingObjective):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0.

    t in [0, 1] is the noise level; the backbone sees t * num_train_timesteps, the timesteps of diffusers'
    `FlowMatchEulerDiscreteScheduler`, which (with `FlowMatchHeunDiscreteScheduler`) samples the model.

    Args:
        scheduler: the `FlowMatchEulerDiscreteScheduler` whose config the sampling schedulers copy
            (`num_train_timesteps`, `shift`; a sampler may set its own `shift`).
        time_sampling: "uniform" t, or "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3).
        logit_mean, logit_std: parameters of the logit-normal distribution.
        loss_weighting: only "none" (plain MSE on the velocity).
        cosine_weight: adds this times `1 - cos(pred, target)` over the channels, averaged over the pixels
            (LightningDiT's `use_cosine_loss`, weight 1); 0: none.
    """

    kind = "flow-matching"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    prediction_type = "flow"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        loss_weighting: str = "none",
        cosine_weight: float = 0.0,
    ):
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"diffusion.scheduler={type(scheduler).__name__} cannot define flow matching; "
                "use diffusers.FlowMatchEulerDiscreteScheduler (diffusion=flow)"
            )
        if time_sampling not in FLOW_TIME_SAMPLINGS:
            raise ValueError(
                f"diffusion.time_sampling={time_sampling!r} is not supported; "
                f"use one of {', '.join(FLOW_TIME_SAMPLINGS)}"
            )
        if logit_std <= 0:
            raise ValueError(f"diffusion.logit_std={logit_std} must be > 0")
        if loss_weighting != "none":
            raise ValueError(f"diffusion.loss_weighting={loss_weighting!r} is not supported by flow matching; use none")
        self.scheduler = scheduler
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)
        if cosine_weight < 0:
            raise ValueError(f"diffusion.cosine_weight={cosine_weight} must be >= 0")
        self.loss_weighting, self.cosine_weight = loss_weighting, float(cosine_weight)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    @classmethod
    def takes_sampler(cls, scheduler_class: type) -> bool:
        """The schedulers that integrate a flow-matching velocity (diffusers' FlowMatch*)."""
        return scheduler_class.__name__.startswith("FlowMatch")

    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise levels t (B,) in (0, 1), float32."""
        where = generator.device if generator is not None else device  # draw where the generator lives
        if self.time_sampling == "uniform":
            t = torch.rand((batch_size,), generator=generator, device=where)
        else:
            z = torch.randn((batch_size,), generator=generator, device=where)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return t.to(device)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity d x_t / d t = eps - x0 (what `FlowMatchEulerDiscreteScheduler.step` integrates)."""
        return eps - x0

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps."""
        t_ = t.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))  # (B, 1, 1, 1)
        return (1.0 - t_) * x0 + t_ * eps

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The backbone's timesteps: t * num_train_timesteps, as the FlowMatch* schedulers pass them."""
        return t * self.num_timesteps

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Plain MSE: weight 1 (B,)."""
        return torch.ones(t.shape, device=t.device)

    def extra_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`cosine_weight` times the mean over pixels of `1 - cos(pred, target)` along the channels (B,)."""
        if self.cosine_weight == 0.0:
            return torch.zeros(pred.shape[0], device=pred.device)
        cosine = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=1)  # (B, h, w)
        return self.cosine_weight * (1.0 - cosine).flatten(1).mean(1)
