"""SiT's samplers: the SDE step by step against a transcription of SiT's `transport` (Linear path, velocity model,
diffusion form "sigma", last step "Mean"), in SiT's own time and sign convention; the ODE solver's grid, time and
sign against a hand-written Euler loop and a linear ODE's closed form."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.samplers.flow_ode import FlowMatchODESolver
from latentdiff.samplers.flow_sde import FlowMatchSDEScheduler
from latentdiff.samplers.loop import sample_loop


def sit_sample_sde(velocity, x, num_steps: int, last_step_size: float, norm: float, noises: list[torch.Tensor]):
    """SiT: t = linspace(0, 1 - last, num_steps); Euler-Maruyama over t[:-1]; then x + drift(x, t1) * last."""
    t = torch.linspace(0, 1 - last_step_size, num_steps, dtype=torch.float64)
    dt = t[1] - t[0]

    def drift(x, ti):
        v = velocity(x, ti)  # data - noise, at SiT's time ti (0: noise)
        score = (ti * v - x) / (1 - ti)  # path.get_score_from_velocity for the Linear path
        return v + norm * (1 - ti) * score  # sde_drift = drift + diffusion * score

    for i, ti in enumerate(t[:-1]):
        mean_x = x + drift(x, ti) * dt
        x = mean_x + torch.sqrt(2 * norm * (1 - ti)) * noises[i] * torch.sqrt(dt)
    return x + drift(x, t[-1]) * last_step_size


@pytest.mark.parametrize(("steps", "last", "norm"), [(6, 0.04, 1.0), (10, 0.1, 0.5), (4, 0.04, 0.0)])
def test_steps_are_sits(steps, last, norm):
    torch.manual_seed(0)
    w = torch.randn(1, 2, 1, 1) * 0.5

    def sit_velocity(x, s):  # any smooth function of (x, s), in SiT's convention
        return torch.tanh(x * w) * (1 + s) - 0.3 * x

    def ours(x, timesteps, cond=None):  # the same network seen from this project: t = 1 - s, velocity negated
        s = 1 - timesteps.double().view(-1, 1, 1, 1) / 1000
        return -sit_velocity(x.double(), s).float()

    train = FlowMatchEulerDiscreteScheduler()
    scheduler = make_sampling_scheduler(
        functools.partial(FlowMatchSDEScheduler.from_config, last_step_size=last, diffusion_norm=norm), train
    )
    noise = torch.randn(3, 2, 4, 4)
    out = sample_loop(ours, scheduler, noise, steps, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(3, 2, 4, 4, generator=g).double() for _ in range(steps - 1)]
    expected = sit_sample_sde(sit_velocity, noise.double(), steps, last, norm, noises)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert scheduler.timesteps[0] == 1000 and scheduler.timesteps[-1] == pytest.approx(1000 * last, abs=1e-3)


def test_bad_options_are_one_line():
    for size in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"sampler.scheduler.last_step_size={size} must be in \(0, 1\)"):
            FlowMatchSDEScheduler(last_step_size=size)
    with pytest.raises(ValueError, match=r"sampler.steps=1 must be >= 2"):
        FlowMatchSDEScheduler().set_timesteps(1)


def _solver(**kwargs) -> FlowMatchODESolver:
    partial = functools.partial(FlowMatchODESolver.from_config, **kwargs)
    return make_sampling_scheduler(partial, FlowMatchEulerDiscreteScheduler())


def test_fixed_grid_euler_is_sits_euler_loop():
    torch.manual_seed(0)
    w = torch.randn(1, 2, 1, 1)

    def sit_velocity(x, s):
        return torch.tanh(x * w) * (1 + s) - 0.3 * x

    def ours(x, timesteps, cond=None):
        s = 1 - timesteps.view(-1, 1, 1, 1) / 1000
        return -sit_velocity(x, s)

    noise = torch.randn(2, 2, 3, 3)
    out = sample_loop(ours, _solver(method="euler"), noise, 8)
    grid, x = torch.linspace(0, 1, 8), noise.clone()
    for s0, s1 in itertools.pairwise(grid):
        x = x + (s1 - s0) * sit_velocity(x, s0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


def test_dopri5_solves_a_linear_ode_to_its_tolerance():
    k = torch.tensor([0.5, -1.5]).view(1, 2, 1, 1)  # dx/ds = -v_ours = -k x: x(1) = x(0) exp(-k)
    solver = _solver()
    out = sample_loop(lambda x, t, c=None: k * x, solver, torch.ones(1, 2, 2, 2), 250)
    torch.testing.assert_close(out, torch.exp(-k).expand_as(out), rtol=2e-3, atol=1e-5)
    assert 6 <= solver.evaluations < 250  # adaptive: its own steps, not the 250 output times


def test_dopri5_keeps_only_the_end_and_ends_where_sits_whole_grid_ends():
    """SiT asks torchdiffeq for all 250 output times; an adaptive solver steps on its own, so asking for the
    end alone gives the same x0 (bit for bit) without holding 250 states."""
    from torchdiffeq import odeint

    def velocity(x, t, c=None):  # ours (noise - data) at 1000 t: nonlinear in x and in time
        return 0.5 * (torch.as_tensor(t).reshape(-1, 1, 1, 1) / 1000.0) * x - torch.sin(3 * x)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = _solver().solve(velocity, noise, 250)

    def sit(s, x):
        return -velocity(x, (1.0 - s) * 1000.0)

    grid = torch.linspace(0.0, 1.0, 250)
    theirs = odeint(sit, noise, grid, method="dopri5", atol=1e-6, rtol=1e-3)[-1]
    assert torch.equal(ours, theirs)


def test_bad_solver_options_are_one_line():
    with pytest.raises(ValueError, match=r"sampler.scheduler.method='rk45' is not a torchdiffeq method; use one of"):
        FlowMatchODESolver(method="rk45")
    with pytest.raises(ValueError, match=r"sampler.steps=1 must be >= 2 for the ODE solver"):
        FlowMatchODESolver().solve(lambda x, t: x, torch.zeros(1, 1, 1, 1), 1)


def test_an_adaptive_solver_is_refused_for_fid_under_fsdp(tmp_path, monkeypatch):
    """Each rank's FID samples take their own number of dopri5 steps; every FSDP forward needs all ranks."""
    import numpy as np

    from latentdiff.callbacks import previews

    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    adaptive = functools.partial(FlowMatchODESolver.from_config, method="dopri5", atol=1e-6, rtol=1e-3)
    fixed = functools.partial(FlowMatchODESolver.from_config, method="euler")
    monkeypatch.setattr(previews, "shards_parameters", lambda trainer: True)
    previews.FID(str(tmp_path / "ref.npz"), fixed).setup(None, None, "fit")
    with pytest.raises(ValueError, match=r"method=dopri5 \(adaptive\) cannot run under FSDP"):
        previews.FID(str(tmp_path / "ref.npz"), adaptive).setup(None, None, "fit")
    monkeypatch.setattr(previews, "shards_parameters", lambda trainer: False)  # DDP: each rank has the whole model
    previews.FID(str(tmp_path / "ref.npz"), adaptive).setup(None, None, "fit")


def test_lightningdits_shifted_euler_grid_is_its_own():
    """LightningDiT's sampler (transport/integrators.py): t = linspace(0, 1, 250), t = s t / (1 + (s - 1) t) with
    s = 0.3, then torchdiffeq's fixed-grid Euler: 249 steps, the model seeing SiT's shifted time."""
    seen = []

    def velocity(x, t, c=None):
        seen.append(float(t[0]))
        return 0.1 * x

    solver = _solver(method="euler", timestep_shift=0.3)
    solver.solve(velocity, torch.ones(1, 1, 1, 1), 250)
    s = torch.linspace(0.0, 1.0, 250)
    official = 0.3 * s / (1 + (0.3 - 1) * s)  # on SiT's time; the network sees 1000 (1 - t) here
    assert len(seen) == 249 and seen == pytest.approx((1000 * (1 - official[:-1])).tolist(), abs=1e-3)
    with pytest.raises(ValueError, match=r"sampler\.scheduler\.timestep_shift=0 must be > 0"):
        _solver(timestep_shift=0)
