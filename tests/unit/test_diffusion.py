"""Diffusion glue: targets and weights against diffusers and the papers, CFG, the sampling loop."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)

from latentdiff.errors import ConfigError
from latentdiff.objectives.flow import FlowMatching
from latentdiff.objectives.gaussian import GaussianDiffusion
from latentdiff.samplers.cfg import guided_output
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.samplers.flow_ode import FlowMatchODESolver
from latentdiff.samplers.flow_sde import FlowMatchSDEScheduler
from latentdiff.samplers.loop import sample_loop
from latentdiff.validation import check_values


def _scheduler(prediction_type="epsilon", beta_schedule="linear"):
    return DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_match_the_definitions(prediction_type):
    diffusion = GaussianDiffusion(_scheduler(prediction_type))
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ab = diffusion.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}
    torch.testing.assert_close(diffusion.target(x0, eps, t), expected[prediction_type])


def test_loss_is_zero_for_the_exact_predictor_and_weighted_by_min_snr():
    diffusion = GaussianDiffusion(_scheduler("epsilon"), loss_weighting="min_snr", min_snr_gamma=5.0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 300, 900])
    loss, mse = diffusion.loss(lambda x_t, t_, c: eps, x0, None, t=t, eps=eps)
    assert loss.item() == 0 and torch.all(mse == 0)
    # predicting zeros: mse is E[eps^2] per sample, weighted by min(snr, 5) / snr
    loss, mse = diffusion.loss(lambda x_t, t_, c: torch.zeros_like(x_t), x0, None, t=t, eps=eps)
    snr = diffusion.snr(t)
    torch.testing.assert_close(mse, eps.pow(2).flatten(1).mean(1))
    torch.testing.assert_close(loss, (torch.minimum(snr, torch.tensor(5.0)) / snr * mse).mean())
    assert snr[0] > 5 > snr[2]  # both branches of the min are exercised


@pytest.mark.parametrize(("prediction_type", "weight_at_high_snr"), [("v_prediction", "g/(snr+1)"), ("sample", "g")])
def test_min_snr_forms(prediction_type, weight_at_high_snr):
    diffusion = GaussianDiffusion(_scheduler(prediction_type), loss_weighting="min_snr", min_snr_gamma=2.0)
    t = torch.tensor([0, 999])
    snr = diffusion.snr(t)
    w = diffusion.loss_weight(t)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(2.0)) / (snr + 1))
    else:
        torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(2.0)))


def test_bad_options():
    with pytest.raises(ValueError, match="diffusion.loss_weighting='p2' is not supported; use one of none, min_snr"):
        GaussianDiffusion(_scheduler(), loss_weighting="p2")


def test_cfg_combines_all_channels_in_one_batch():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        # conditional output = 2 everywhere, unconditional = 1 (cond id 9 is the null class)
        return torch.where((cond == 9).view(-1, 1, 1, 1), 1.0, 2.0).expand_as(x).clone()

    x, t = torch.zeros(3, 4, 2, 2), torch.zeros(3, dtype=torch.long)
    cond, null = torch.tensor([0, 1, 2]), torch.full((3,), 9)
    out = guided_output(model, x, t, cond, null, guidance_scale=4.0)
    assert calls == [6]  # one batched call
    torch.testing.assert_close(out, torch.full_like(x, 1 + 4.0 * (2 - 1)))  # every channel, incl. the 4th
    assert torch.equal(guided_output(model, x, t, cond, null, 1.0), torch.full_like(x, 2.0))
    assert calls[-1] == 3  # w = 1 runs the model once


GAUSSIAN_SAMPLERS = [
    (DDIMScheduler, {"timestep_spacing": "trailing"}, 20),
    (DPMSolverMultistepScheduler, {}, 10),
    (DPMSolverMultistepScheduler, {"solver_order": 3}, 10),
    (DDPMScheduler, {"timestep_spacing": "trailing"}, 50),
    (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, 30),
    (HeunDiscreteScheduler, {"timestep_spacing": "trailing"}, 15),
]
CASES = [
    *[("epsilon", False, *s) for s in GAUSSIAN_SAMPLERS],
    *[("v_prediction", False, *s) for s in GAUSSIAN_SAMPLERS],
    *[("sample", False, *s) for s in GAUSSIAN_SAMPLERS[:3]],
    *[("v_prediction", True, *s) for s in (GAUSSIAN_SAMPLERS[0], GAUSSIAN_SAMPLERS[1], GAUSSIAN_SAMPLERS[4])],
    ("flow", False, FlowMatchEulerDiscreteScheduler, {}, 20),
    ("flow", False, FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, 20),
    ("flow", False, FlowMatchHeunDiscreteScheduler, {}, 10),
    ("flow", False, FlowMatchSDEScheduler, {"diffusion_norm": 0.0}, 20),  # its ODE (the SDE: test_flow_samplers)
    ("flow", False, FlowMatchODESolver, {}, 250),
]


@pytest.mark.parametrize(("objective", "zero_snr", "cls", "kwargs", "steps"), CASES)
def test_sampling_with_the_ideal_model_recovers_the_data_point(objective, zero_snr, cls, kwargs, steps):
    """With data = one point x*, the exact model is the objective's training target with the noise that x_t
    implies: every sampler must land on x*. A target convention that differs from the sampler's fails."""
    if objective == "flow":
        diffusion = FlowMatching(FlowMatchEulerDiscreteScheduler())
    else:
        train = DDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=objective,
            rescale_betas_zero_snr=zero_snr,
            clip_sample=False,
        )
        diffusion = GaussianDiffusion(train)
    x_star = torch.randn(1, 2, 4, 4).clamp(-1.5, 1.5)

    def ideal(x_t, t, cond):
        if objective == "flow":
            s = (t.float() / diffusion.num_timesteps).view(-1, 1, 1, 1)
            eps = (x_t - (1 - s) * x_star) / s
            return diffusion.target(x_star.expand_as(x_t), eps, t)
        ab = diffusion.scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1).float()
        eps = (x_t - ab.sqrt() * x_star) / (1 - ab).clamp(min=1e-12).sqrt()
        if zero_snr:  # at SNR 0 x_t is pure noise: x_t itself is eps
            eps = torch.where(ab < 1e-6, x_t, eps)
        return diffusion.target(x_star.expand_as(x_t), eps, t.long())

    scheduler = make_sampling_scheduler(functools.partial(cls.from_config, **kwargs), diffusion.scheduler)
    noise = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_loop(ideal, scheduler, noise, steps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star.expand_as(out), atol=3e-2, rtol=0)


def test_flow_matching_interpolates_and_targets_the_velocity():
    diffusion = FlowMatching(FlowMatchEulerDiscreteScheduler(), time_sampling="logit_normal")
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def model(x_t, timesteps, cond):
        seen["x_t"], seen["t"] = x_t, timesteps
        return eps - x0  # the exact velocity

    loss, _ = diffusion.loss(model, x0, None, t=t, eps=eps)
    assert loss == 0 and torch.equal(seen["t"], t * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    draws = diffusion.sample_timesteps(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert draws.min() > 0 and draws.max() < 1 and abs(draws.median() - 0.5) < 0.02  # logit-normal(0, 1)
    assert abs((draws < 0.1).float().mean() - 0.0142) < 0.005  # P(sigmoid(n) < 0.1) = Phi(-2.197)


def test_objective_and_sampler_must_fit():
    flow = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="sampler.scheduler=DDIMScheduler cannot sample a flow-matching model"):
        make_sampling_scheduler(DDIMScheduler.from_config, flow)
    with pytest.raises(ValueError, match="cannot sample a Gaussian diffusion model"):
        make_sampling_scheduler(FlowMatchEulerDiscreteScheduler.from_config, _scheduler())
    zero = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="HeunDiscreteScheduler cannot follow the zero-terminal-SNR schedule"):
        make_sampling_scheduler(HeunDiscreteScheduler.from_config, zero)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=true needs prediction_type=v_prediction or sample"):
        GaussianDiffusion(DDPMScheduler(rescale_betas_zero_snr=True))


def test_guidance_interval_guides_only_inside():
    seen = []

    def model(x, t, cond):
        seen.append((int(t[0]), x.shape[0]))
        return torch.zeros_like(x)

    scheduler = DDIMScheduler.from_config(_scheduler().config, timestep_spacing="trailing")
    cond, null = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    sample_loop(model, scheduler, torch.zeros(2, 1, 2, 2), 4, cond, null, 3.0, guidance_interval=(300, 700))
    assert seen == [(999, 2), (749, 2), (499, 4), (249, 2)]  # the doubled (guided) batch only inside


def test_sampler_steps_must_be_positive():
    # checked once, with the config, before any work: the loops (and the callbacks' samplers) take it from there
    for key in ("sampler", "callbacks.sample_grid", "callbacks.fid"):
        node = {"steps": 0}
        for part in reversed(key.split(".")):
            node = {part: node}
        with pytest.raises(ConfigError, match=f"{key}.steps=0 must be a positive integer"):
            check_values(node)


def test_lightningdits_cosine_term_is_added_to_the_mse():
    """diffusion=flow_lightningdit: loss = MSE + mean_flat(1 - cosine_similarity(pred, target, dim=1)), as
    LightningDiT's transport computes it with use_cosine_loss."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentdiff.objectives.flow import FlowMatching

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])

    def model(x, timesteps, cond=None):
        return 0.3 * x + 0.01 * timesteps.view(-1, 1, 1, 1)

    plain = FlowMatching(FlowMatchEulerDiscreteScheduler(), time_sampling="logit_normal")
    cosine = FlowMatching(FlowMatchEulerDiscreteScheduler(), time_sampling="logit_normal", cosine_weight=1.0)
    loss, mse = cosine.loss(model, x0, None, t=t, eps=eps)
    plain_loss, plain_mse = plain.loss(model, x0, None, t=t, eps=eps)
    pred, target = model((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, t * 1000), eps - x0
    cos = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=1)  # (B, h, w)
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) + cos.mean(dim=(1, 2))
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(mse, plain_mse)  # the logged MSE is the MSE alone
    assert loss > plain_loss
    with pytest.raises(ValueError, match=r"diffusion\.cosine_weight=-1\.0 must be >= 0"):
        FlowMatching(FlowMatchEulerDiscreteScheduler(), cosine_weight=-1.0)


def test_the_cosine_term_on_sits_time_is_lightningdits_loss():
    """A DiT on SiT's time returns SiT's velocity negated; LightningDiT's loss in SiT's convention (target
    data - noise, its network's raw output) is the same number: the MSE and the cosine do not see the sign."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentdiff.models.dit import DiT
    from latentdiff.objectives.flow import FlowMatching

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=3,
                learn_sigma=False, swiglu=True, rope=True, rmsnorm=True, time_convention="sit")  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([0.1, 0.5, 0.8]), torch.tensor([0, 1, 2])
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(), time_sampling="logit_normal", cosine_weight=1.0)
    with torch.no_grad():
        ours, _ = objective.loss(model, x0, y, t=t, eps=eps)
        s = (1 - t).view(-1, 1, 1, 1)  # SiT's time: 1 is data
        u = -model(s * x0 + (1 - s) * eps, 1000 * t, y)  # the network's own output: SiT's velocity
        ut = x0 - eps
        mse = ((u - ut) ** 2).mean(dim=(1, 2, 3))
        cos = (1 - torch.nn.functional.cosine_similarity(u, ut, dim=1)).mean(dim=(1, 2))
    torch.testing.assert_close(ours, mse.mean() + cos.mean())
