"""Learned variance: the hybrid loss's L_vb against a direct computation of the bound on a toy schedule, the
stop-gradient on the mean, guidance of the prediction only, and DDPM's learned-range sampling step by step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence

from latentdiff.objectives.gaussian import GaussianDiffusion
from latentdiff.samplers.cfg import guided_output
from latentdiff.samplers.loop import sample_loop

TOY = dict(num_train_timesteps=10, beta_schedule="linear", beta_start=0.01, beta_end=0.2, clip_sample=False)


class Fixed(torch.nn.Module):
    """A 'backbone' that returns a fixed prediction and variance values (2C channels), with gradients."""

    learns_variance = True

    def __init__(self, pred: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.pred, self.v = torch.nn.Parameter(pred.clone()), torch.nn.Parameter(v.clone())

    def forward(self, x, t, cond=None):
        return torch.cat([self.pred, self.v], dim=1)


def direct_bound(x0, x_t, eps_hat, v, t: int, betas: torch.Tensor) -> torch.Tensor:
    """L_vb per sample in bits per dimension, from the definitions: Bayes' rule for q(x_{t-1} | x_t, x0) and
    torch.distributions for the KL; at t = 0 the probability of x0's 8-bit bin under the exact normal CDF."""
    betas = betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)
    ab, beta = alpha_bar[t], betas[t]
    ab_prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()

    def posterior(x0_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta if t > 0 else 1 / beta  # t = 0: x_{-1} is x0 itself
        var = 1 / precision
        mean = var * (ab_prev.sqrt() * x0_ / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta) if t > 0 else None
        return mean, var

    def post_var(s: int) -> torch.Tensor:  # beta~_s
        prev = alpha_bar[s - 1] if s > 0 else torch.tensor(1.0, dtype=torch.float64)
        return betas[s] * (1 - prev) / (1 - alpha_bar[s])

    lower = post_var(max(t, 1))  # clipped at t = 0 to beta~_1, as ADM
    log_var = (v + 1) / 2 * beta.log() + (1 - (v + 1) / 2) * lower.log()
    if t > 0:
        true_mean, true_var = posterior(x0)
        model_mean, _ = posterior(x0_hat)
        kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, (0.5 * log_var).exp()))
        return kl.flatten(1).mean(1) / math.log(2)
    model_mean = x0_hat  # the posterior mean at t = 0 is x0_hat (coefficient of x_t is 0)
    dist = Normal(model_mean, (0.5 * log_var).exp())
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), dist.cdf(x0 + 1 / 255))
    lower_cdf = torch.where(x0 < -0.999, torch.zeros_like(x0), dist.cdf(x0 - 1 / 255))
    return -(upper - lower_cdf).log().flatten(1).mean(1) / math.log(2)


@pytest.mark.parametrize("t", [0, 1, 5, 9])
def test_hybrid_loss_is_the_mse_plus_the_bound(t):
    torch.manual_seed(0)
    objective = GaussianDiffusion(DDPMScheduler(**TOY))
    x0 = (torch.rand(2, 3, 4, 4) * 2 - 1).double()
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # the two open end bins
    eps = torch.randn_like(x0)
    pred = eps + 0.1 * torch.randn_like(x0)  # an imperfect noise prediction
    v = torch.rand_like(x0) * 2 - 1
    model = Fixed(pred.float(), v.float())
    ts = torch.full((2,), t)
    loss, mse = objective.loss(model, x0.float(), None, t=ts, eps=eps.float())
    x_t = objective.noisy(x0.float(), eps.float(), ts).double()
    expected_vb = direct_bound(x0, x_t, pred, v, t, objective.scheduler.betas)
    torch.testing.assert_close(mse.double(), (pred - eps).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)
    # t = 0: ADM's tanh approximation of the normal CDF, against the exact one
    tol = dict(rtol=2e-3, atol=1e-4) if t == 0 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), (mse.double() + expected_vb).mean(), **tol)
    # the bound trains the variance only: the prediction's gradient is the MSE's
    loss.backward()
    torch.testing.assert_close(model.pred.grad.double(), 2 * (pred - eps) / pred[0].numel() / 2, rtol=1e-4, atol=1e-7)
    assert model.v.grad.abs().sum() > 0


def test_without_variance_channels_the_loss_is_the_plain_mse():
    objective = GaussianDiffusion(DDPMScheduler(**TOY))
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss, mse = objective.loss(lambda x, t, c: eps + 0.5, x0, None, t=torch.tensor([2, 7]), eps=eps)
    assert loss.item() == pytest.approx(0.25) and torch.allclose(mse, torch.full((2,), 0.25))


def test_guidance_moves_the_prediction_and_keeps_the_conditional_variance():
    def model(x, t, cond):  # prediction = class id, variance values = -class id / 10
        c = cond.float().view(-1, 1, 1, 1).expand(-1, 2, 2, 2)
        return torch.cat([c, -c / 10], dim=1)

    out = guided_output(model, torch.zeros(1, 2, 2, 2), torch.tensor([3]), torch.tensor([1]), torch.tensor([5]), 3.0)
    assert torch.allclose(out[:, :2], torch.full((1, 2, 2, 2), 5 + 3.0 * (1 - 5)))  # uncond + w (cond - uncond)
    assert torch.allclose(out[:, 2:], torch.full((1, 2, 2, 2), -0.1))  # the conditional variance values


def test_learned_range_sampling_follows_adm_step_by_step():
    """sample_loop with DDPM learned-range and linspace spacing equals ADM's p_sample loop over its respaced
    schedule (`space_timesteps(N, "K")`: the new betas from alpha_bar at the kept steps)."""
    train = DDPMScheduler(**TOY)
    sampler = DDPMScheduler.from_config(train.config, variance_type="learned_range", timestep_spacing="linspace")
    steps = 4
    kept = [round(i * (TOY["num_train_timesteps"] - 1) / (steps - 1)) for i in range(steps)]  # ADM's spacing
    torch.manual_seed(0)
    w_eps, w_v = torch.randn(2, 2, 1, 1) * 0.3, torch.rand(2, 2, 1, 1) * 2 - 1

    def model(x, t, cond=None):  # a fixed function of x and t: eps = x w, v in (-1, 1)
        scale = 1 + t.float().view(-1, 1, 1, 1) / 10
        return torch.cat([x * w_eps * scale, torch.tanh(w_v * scale).expand_as(x)], dim=1)

    noise = torch.randn(2, 2, 3, 3)
    ours = sample_loop(model, sampler, noise, steps, generator=torch.Generator().manual_seed(7))

    alpha_bar_full = train.alphas_cumprod.double()
    ab = alpha_bar_full[kept]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    betas = 1 - ab / ab_prev
    post_var = betas * (1 - ab_prev) / (1 - ab)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    g = torch.Generator().manual_seed(7)
    x = noise.double()
    for i in reversed(range(steps)):
        out = model(x.float(), torch.tensor([kept[i]] * 2)).double()
        eps, v = out[:, :2], out[:, 2:]
        x0 = (x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        mean = (
            betas[i] * ab_prev[i].sqrt() / (1 - ab[i]) * x0 + (1 - ab_prev[i]) * (1 - betas[i]).sqrt() / (1 - ab[i]) * x
        )
        frac = (v + 1) / 2
        log_var = frac * betas[i].log() + (1 - frac) * log_post[i]
        z = torch.randn(x.shape, generator=g).double()
        x = mean + ((0.5 * log_var).exp() * z if i > 0 else 0)
    torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-5)
