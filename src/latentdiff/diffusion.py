"""Diffusion glue around diffusers schedulers: training targets, loss weighting, CFG, the sampling loop.

The schedule itself (betas, alpha_bar, `add_noise`, `step`) always comes from a diffusers scheduler; this
module only writes what diffusers leaves to the training script.

Glossary (DDPM notation, discrete t in [0, N)):
    x0        clean latent (B, C, h, w)
    eps       standard normal noise, same shape
    t         integer timesteps (B,), diffusers convention (0 = least noisy)
    alpha_bar cumulative product of (1 - beta) at t
    x_t       sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps        (scheduler.add_noise)
    v         sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0        (scheduler.get_velocity)
    snr       alpha_bar / (1 - alpha_bar)
    flow      rectified flow (`FlowMatching`): x_t = (1 - t) x0 + t eps, t in [0, 1], velocity eps - x0;
              the backbone sees t * num_train_timesteps (diffusers' FlowMatch* scheduler timesteps)
    w         classifier-free guidance weight, diffusers/DiT convention:
              out = uncond + w * (cond - uncond); w = 1 is no guidance; U-ViT's `scale` s is w = 1 + s
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

DIFFUSION_SAMPLERS = "ddim, dpm_solver, euler, heun, ddpm, flow_euler or flow_heun"  # conf/sampler/ of Gaussian/flow
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("none", "min_snr")
FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")
Backbone = Callable[..., torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None


class _Objective:
    """What the training objectives share: the loss is the (weighted) MSE between the backbone's output on the
    noised input and the objective's target. Subclasses define `noisy`, `model_timesteps`, `target`,
    `loss_weight` and `sample_timesteps`."""

    def loss(
        self,
        model: Backbone,
        x0: torch.Tensor,
        cond: torch.Tensor | None,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of `model` on clean latents x0.

        Args:
            model: backbone, called as model(x_t, timesteps, cond).
            x0: clean latents (B, C, h, w).
            cond: class ids (B,), text features (B, L, D) or None.
            t: timesteps (B,) as `sample_timesteps` draws them; drawn when None.
            eps: noise like x0; drawn when None.
            generator: RNG for t and eps (for fixed validation noise).

        Returns:
            The weighted mean loss (scalar) and the unweighted per-sample MSE (B,).
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if eps is None:
            eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.noisy(x0, eps, t)  # (B, C, h, w)
        pred = model(x_t, self.model_timesteps(t), cond)  # (B, C, h, w), or (B, 2C, h, w) with learned variance
        pred = pred[:, : x0.shape[1]]  # the mean part; a learned variance would need its own VLB term
        mse = (pred.float() - self.target(x0, eps, t).float()).pow(2).flatten(1).mean(1)  # (B,)
        return (self.loss_weight(t) * mse).mean(), mse.detach()

    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps: standard normal noise of `shape`, drawn on the generator's device (CPU when None)."""
        where = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=where)


class GaussianDiffusion(_Objective):
    """Training objective for a discrete-time Gaussian diffusion defined by a diffusers `DDPMScheduler`.

    Args:
        scheduler: the training schedule; its `prediction_type` picks the target (eps, v or x0).
        loss_weighting: "none" (plain MSE on the target) or "min_snr" (Hang et al. 2023, min-SNR-gamma).
        min_snr_gamma: gamma of min-SNR weighting.
    """

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

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Uniform integer timesteps (B,) in [0, N)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (the scheduler's `add_noise`)."""
        return self.scheduler.add_noise(x0, eps, t)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FlowMatching(_Objective):
    """Rectified flow (Liu et al. 2023; Esser et al. 2024): x_t = (1 - t) x0 + t eps, velocity target eps - x0.

    t in [0, 1] is the noise level; the backbone sees t * num_train_timesteps, the timesteps of diffusers'
    `FlowMatchEulerDiscreteScheduler`, which (with `FlowMatchHeunDiscreteScheduler`) samples the model.

    Args:
        scheduler: the `FlowMatchEulerDiscreteScheduler` whose config the sampling schedulers copy
            (`num_train_timesteps`, `shift`; a sampler may set its own `shift`).
        time_sampling: "uniform" t, or "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3).
        logit_mean, logit_std: parameters of the logit-normal distribution.
        loss_weighting: only "none" (plain MSE on the velocity).
    """

    prediction_type = "flow"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        loss_weighting: str = "none",
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
        self.loss_weighting = loss_weighting
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
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
        return torch.ones(t.shape, device=t.device)


def is_flow_scheduler(scheduler_class: type) -> bool:
    """Whether a diffusers scheduler class integrates a flow-matching velocity (FlowMatch*)."""
    return scheduler_class.__name__.startswith("FlowMatch")


def is_token_scheduler(scheduler_class: type) -> bool:
    """Whether a diffusers scheduler class unmasks discrete tokens (AmusedScheduler, `latentdiff.masking`)."""
    return scheduler_class.__name__ == "AmusedScheduler"


def null_condition(
    cond: torch.Tensor | None, num_classes: int, null_text: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The unconditional input shaped like `cond`: the null class id `num_classes`, or the empty-prompt
    features `null_text` (L, D) for text features (B, L, D)."""
    if cond is None:
        return None
    if not cond.is_floating_point():
        return torch.full_like(cond, num_classes)
    if null_text is None:
        raise ValueError("text conditioning needs the empty-prompt features (module.null_text); none were set")
    return null_text.to(cond.device, cond.dtype).expand_as(cond)


def guided_output(
    model: Backbone,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance, the project's one helper: uncond + w * (cond - uncond) on all channels.

    Conditional and unconditional halves run in one batch. With w == 1 or no condition the model runs once.

    Args:
        model: backbone, model(x, t, cond).
        x: (B, C, h, w) noisy latents.
        t: (B,) timesteps.
        cond: (B,) class ids or (B, L, D) text features, or None.
        null_cond: the "no condition" input shaped like cond (null class id / empty-prompt features).
        guidance_scale: w (diffusers/DiT convention; U-ViT's scale s is w = 1 + s).
    """
    if cond is None or guidance_scale == 1.0:
        return model(x, t, cond)
    if null_cond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional input (null class or empty prompt)")
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond.expand_as(cond)]))  # (2B, ...)
    out_cond, out_uncond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def make_sampling_scheduler(scheduler_partial: Callable[..., SchedulerMixin], train_scheduler) -> SchedulerMixin:
    """A sampling scheduler (DDIM, DPM-Solver++, Euler, ...) sharing the training schedule's betas and target.

    `scheduler_partial` is e.g. `functools.partial(DDIMScheduler.from_config, timestep_spacing="trailing")`,
    as Hydra builds it from `conf/sampler/*.yaml`.

    Raises:
        ValueError: the sampler cannot follow the training objective (flow vs Gaussian; zero terminal SNR
            on a scheduler that cannot rescale its betas).
    """
    scheduler = scheduler_partial(train_scheduler.config)
    token_train, token_sample = is_token_scheduler(type(train_scheduler)), is_token_scheduler(type(scheduler))
    if token_train != token_sample:
        raise ValueError(
            f"sampler.scheduler={type(scheduler).__name__} cannot sample a "
            f"{'masked-token' if token_train else 'diffusion'} model (diffusion={type(train_scheduler).__name__}); "
            f"use sampler={'amused' if token_train else DIFFUSION_SAMPLERS}"
        )
    if token_train:
        return scheduler
    flow_train, flow_sample = is_flow_scheduler(type(train_scheduler)), is_flow_scheduler(type(scheduler))
    if flow_train != flow_sample:
        allowed = "flow_euler or flow_heun" if flow_train else "ddpm, ddim, dpm_solver, euler or heun"
        raise ValueError(
            f"sampler.scheduler={type(scheduler).__name__} cannot sample a "
            f"{'flow-matching' if flow_train else 'Gaussian diffusion'} model "
            f"(diffusion={type(train_scheduler).__name__}); use sampler={allowed}"
        )
    can_rescale = "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters
    if train_scheduler.config.get("rescale_betas_zero_snr") and not can_rescale:
        raise ValueError(
            f"sampler.scheduler={type(scheduler).__name__} cannot follow the zero-terminal-SNR schedule "
            "(diffusion.scheduler.rescale_betas_zero_snr=true); use sampler=ddim, ddpm, dpm_solver or euler"
        )
    return scheduler


@torch.no_grad()
def sample_loop(
    model: Backbone,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    num_steps: int,
    cond: torch.Tensor | None = None,
    null_cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    generator: Generators = None,
    step_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run a diffusers scheduler from pure noise to x0 with classifier-free guidance.

    Args:
        model: backbone (usually the EMA copy), model(x, t, cond).
        scheduler: a sampling scheduler (see `make_sampling_scheduler`); its state is reset here.
        noise: (B, C, h, w) standard normal start; the caller owns the seeds (per-sample seeds: `sampling.py`).
        num_steps: number of solver steps.
        cond, null_cond, guidance_scale: as in `guided_output`.
        guidance_interval: (low, high) in training timesteps (0..num_train_timesteps; flow matching:
            t * num_train_timesteps): guidance only where low <= t <= high, the conditional model elsewhere
            (Kynkaanniemi et al. 2024). None: guidance at every step.
        generator: RNG of stochastic steps (DDPM, DDIM with eta > 0): one generator, or one per sample
            (then each sample's noise depends only on its own generator).
        step_kwargs: extra arguments of `scheduler.step` (e.g. eta for DDIM).

    Returns:
        x0 latents (B, C, h, w).
    """
    if num_steps < 1:
        raise ValueError(f"sampler.steps={num_steps} must be >= 1")
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # (B, C, h, w)
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    kwargs = dict(step_kwargs or {})
    if generator is not None and "generator" in _step_params(scheduler):
        kwargs["generator"] = generator
    for t in scheduler.timesteps:
        t_batch = t.expand(x.shape[0]).to(noise.device)  # (B,)
        x_in = scale_input(x, t) if scale_input is not None else x  # (B, C, h, w)
        w = guidance_scale
        if guidance_interval is not None and not guidance_interval[0] <= float(t) <= guidance_interval[1]:
            w = 1.0
        out = guided_output(model, x_in, t_batch, cond, null_cond, w)[:, : x.shape[1]]
        x = scheduler.step(out, t, x, return_dict=False, **kwargs)[0]  # (B, C, h, w)
    return x


def _step_params(scheduler: SchedulerMixin) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
