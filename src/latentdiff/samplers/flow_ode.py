"""SiT's ODE sampler (Ma et al. 2024, `transport/integrators.py`): the probability-flow ODE of a flow-matching
velocity integrated by torchdiffeq, by default with the adaptive dopri5 (Dormand-Prince 5(4)) at SiT's tolerances.

In SiT's time s = 1 - t (0: noise, 1: data) the ODE is dx/ds = v(x, s), v = data - noise = -(this project's
velocity). It is integrated from s = 0 to 1 and read at the end; `steps` is the grid `linspace(0, 1, steps)`:
the output times for an adaptive method, the fixed steps for "euler", "midpoint", "rk4" and the other fixed-grid
methods of torchdiffeq. The denoising loop hands the whole integration to `solve` (`samplers.loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# torchdiffeq's methods (torchdiffeq.odeint's SOLVERS): adaptive first, then fixed-grid
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")


class FlowMatchODESolver(SchedulerMixin, ConfigMixin):
    """A torchdiffeq solver of the flow ODE (module docstring).

    Args:
        num_train_timesteps: the training timesteps' scale (timesteps are 1000 t, t = 1 - s).
        shift: the training scheduler's sampling shift, read from its config; not applied (SiT's grid).
        method: a torchdiffeq method (`ADAPTIVE`, `FIXED_GRID`); SiT: dopri5.
        atol, rtol: the adaptive methods' tolerances (SiT: 1e-6, 1e-3).
        timestep_shift: LightningDiT's shift of the grid on SiT's time, `s t / (1 + (s - 1) t)` (its sampler: 0.3,
            with method=euler); 1: SiT's grid.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        method: str = "dopri5",
        atol: float = 1e-6,
        rtol: float = 1e-3,
        timestep_shift: float = 1.0,
    ):
        if method not in ADAPTIVE + FIXED_GRID:
            raise ValueError(
                f"sampler.scheduler.method={method!r} is not a torchdiffeq method; use one of "
                + ", ".join(ADAPTIVE + FIXED_GRID)
            )
        if atol <= 0 or rtol <= 0:
            raise ValueError(f"sampler.scheduler.atol={atol} and rtol={rtol} must be > 0")
        if timestep_shift <= 0:
            raise ValueError(f"sampler.scheduler.timestep_shift={timestep_shift} must be > 0")
        self.evaluations = 0  # velocity evaluations of the last `solve` (each runs both CFG halves)

    def solve(
        self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        """Integrate from pure noise to x0.

        Args:
            velocity: this project's velocity (noise - data) of x (B, C, h, w) at timesteps (B,) of 1000 t.
            noise: (B, C, h, w) standard normal start.
            num_steps: the points of SiT's grid linspace(0, 1, num_steps) (>= 2).
        Returns:
            x0 (B, C, h, w).
        """
        from torchdiffeq import odeint

        if num_steps < 2:
            raise ValueError(f"sampler.steps={num_steps} must be >= 2 for the ODE solver")
        self.evaluations = 0
        scale = float(self.config.num_train_timesteps)

        def dx_ds(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            self.evaluations += 1
            timesteps = ((1.0 - s) * scale).expand(x.shape[0]).to(x.dtype)
            return -velocity(x, timesteps)  # SiT's velocity: data - noise

        grid = _grid(num_steps, self.config.timestep_shift, noise.dtype).to(noise.device)
        kwargs = {}
        if self.config.method in ADAPTIVE:  # its own steps: SiT's output times only add states (torchdiffeq
            kwargs = {"atol": self.config.atol, "rtol": self.config.rtol}  # interpolates them), the end is the same
            grid = grid[[0, -1]]
        return odeint(dx_ds, noise, grid, method=self.config.method, **kwargs)[-1]

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """The grid's timesteps, for callers that list them (the integration itself is `solve`)."""
        s = _grid(num_inference_steps, self.config.timestep_shift, torch.float64)
        self.timesteps = ((1.0 - s) * self.config.num_train_timesteps).float().to(device)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _grid(num_steps: int, timestep_shift: float, dtype: torch.dtype) -> torch.Tensor:
    """SiT's output times linspace(0, 1, num_steps) on its time s (0: noise), shifted as LightningDiT's sampler does."""
    s = torch.linspace(0.0, 1.0, num_steps, dtype=dtype)
    if timestep_shift != 1.0:
        s = timestep_shift * s / (1.0 + (timestep_shift - 1.0) * s)
    return s


def adaptive_method(scheduler_partial: Any) -> str | None:
    """The adaptive torchdiffeq method a sampler partial (`conf/sampler/*.yaml`'s scheduler) integrates with; None
    for a fixed-grid method or another scheduler."""
    func = getattr(scheduler_partial, "func", None)
    if getattr(func, "__self__", None) is not FlowMatchODESolver:
        return None
    method = getattr(scheduler_partial, "keywords", {}).get("method", "dopri5")
    return method if method in ADAPTIVE else None
