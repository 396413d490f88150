"""Diffusion glue: targets and weights against diffusers and the papers, CFG, the sampling loop."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from latentdiff.diffusion import GaussianDiffusion, guided_output, make_sampling_scheduler, sample_loop


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


@pytest.mark.parametrize(
    ("cls", "kwargs", "steps"),
    [
        (DDIMScheduler, {"timestep_spacing": "trailing"}, 20),
        (DPMSolverMultistepScheduler, {}, 10),
        (DDPMScheduler, {"timestep_spacing": "trailing"}, 50),
    ],
)
def test_sampling_with_the_ideal_denoiser_recovers_the_data_point(cls, kwargs, steps):
    """With data = one point x*, the exact eps-predictor is (x_t - sqrt(ab) x*) / sqrt(1 - ab): samplers land on x*."""
    train = _scheduler("epsilon", "scaled_linear")
    x_star = torch.randn(1, 2, 4, 4).clamp(-1.5, 1.5)
    ab_all = train.alphas_cumprod

    def ideal(x_t, t, cond):
        ab = ab_all[t.long()].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()

    scheduler = make_sampling_scheduler(functools.partial(cls.from_config, **kwargs), train)
    noise = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_loop(ideal, scheduler, noise, steps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star.expand_as(out), atol=2e-2, rtol=0)


def test_sampler_steps_must_be_positive():
    with pytest.raises(ValueError, match="sampler.steps=0 must be >= 1"):
        sample_loop(lambda x, t, c: x, DDIMScheduler(), torch.zeros(1, 1, 2, 2), 0)
