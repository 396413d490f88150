"""The denoising loop: a diffusers sampling scheduler from pure noise to x0, with classifier-free guidance.

Glossary: x (B, C, h, w) the current latents; t the scheduler's timesteps (training units: 0..N-1, or
t * num_train_timesteps for flow matching); w the guidance weight (`samplers.cfg`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from latentdiff.models.contract import Backbone
from latentdiff.objectives.base import Generators
from latentdiff.objectives.variance import LEARNED_VARIANCE
from latentdiff.samplers.cfg import guided_output
from latentdiff.samplers.flow_ode import FlowMatchODESolver


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
        scheduler: a sampling scheduler (`samplers.fit.make_sampling_scheduler`); its state is reset here.
        noise: (B, C, h, w) standard normal start; the caller owns the seeds (`samplers.seeds`).
        num_steps: number of solver steps (>= 1: `sampler.steps` is checked with the config).
        cond, null_cond, guidance_scale: as in `samplers.cfg.guided_output`.
        guidance_interval: (low, high) in training timesteps (0..num_train_timesteps; flow matching:
            t * num_train_timesteps): guidance only where low <= t <= high, the conditional model elsewhere
            (Kynkaanniemi et al. 2024). None: guidance at every step.
        generator: RNG of stochastic steps (DDPM, DDIM with eta > 0): one generator, or one per sample
            (then each sample's noise depends only on its own generator).
        step_kwargs: extra arguments of `scheduler.step` (e.g. eta for DDIM).

    Returns:
        x0 latents (B, C, h, w).
    """
    if isinstance(scheduler, FlowMatchODESolver):  # an ODE solver integrates the whole path itself
        return _solve(model, scheduler, noise, num_steps, cond, null_cond, guidance_scale, guidance_interval)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # (B, C, h, w)
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    kwargs = dict(step_kwargs or {})
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    # DDPM reads the backbone's variance; other schedulers' `learned_range` differs (DPM-Solver keeps 3 channels)
    learned = isinstance(scheduler, DDPMScheduler) and scheduler.config.get("variance_type") in LEARNED_VARIANCE
    for t in scheduler.timesteps:
        t_batch = t.expand(x.shape[0]).to(noise.device)  # (B,)
        x_in = scale_input(x, t) if scale_input is not None else x  # (B, C, h, w)
        w = guidance_scale
        if guidance_interval is not None and not guidance_interval[0] <= float(t) <= guidance_interval[1]:
            w = 1.0
        out = guided_output(model, x_in, t_batch, cond, null_cond, w)  # (B, C, h, w), or 2C with learned variance
        if not learned:
            out = out[:, : x.shape[1]]  # other schedulers take the prediction only (the mean)
        x = scheduler.step(out, t, x, return_dict=False, **kwargs)[0]  # (B, C, h, w)
    return x


def _solve(
    model: Backbone,
    solver: FlowMatchODESolver,
    noise: torch.Tensor,
    num_steps: int,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None,
) -> torch.Tensor:
    """`sample_loop` for an ODE solver: the guided velocity as a function of (x, timesteps), integrated whole."""

    def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        w = guidance_scale
        if guidance_interval is not None and not guidance_interval[0] <= float(timesteps[0]) <= guidance_interval[1]:
            w = 1.0
        return guided_output(model, x, timesteps, cond, null_cond, w)[:, : x.shape[1]]

    return solver.solve(velocity, noise, num_steps)
