"""Learned variance (Nichol & Dhariwal 2021, "Improved DDPM"; trained so by ADM and DiT): the variational-bound
term of the hybrid loss.

A backbone with `learns_variance` returns 2C channels: its usual prediction, then values v (its raw output, not
clamped, as ADM; v in [-1, 1] spans the two bounds) that place the reverse step's log-variance between the two
bounds of DDPM,

    log sigma_t^2 = frac * log beta_t + (1 - frac) * log beta~_t,   frac = (v + 1) / 2,
    beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)      (the posterior variance; clipped at t = 0
                                                                     to its value at t = 1, as ADM)

(diffusers' `variance_type="learned_range"` samples with the same formula). The hybrid loss is the simple MSE on
the prediction plus L_vb, the bound's term at t with the mean frozen (a stop-gradient on the prediction), so the
bound trains only the variance:

    L_vb(t > 0) = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / ln 2             (bits per dimension)
    L_vb(t = 0) = -log p(x0 | x_1) / ln 2, the discretized Gaussian decoder of DDPM (256 bins on [-1, 1])

both averaged over the dimensions of a sample. DiT adds it unscaled (`LossType.MSE`).
"""

from __future__ import annotations

import math

import torch

LEARNED_VARIANCE = ("learned_range",)  # diffusers' `variance_type` that reads the learned variance as trained here


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF by the tanh approximation (as ADM: its loss values, exactly)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of values x in [-1, 1] under N(mean, e^(2 log_scale)) cut into 256 bins of width 2/255, the two
    end bins open (DDPM's decoder), elementwise, in nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class LearnedVariance:
    """The variance bounds of a diffusers `DDPMScheduler`'s schedule and the L_vb term (module docstring).

    Args:
        scheduler: the training schedule (betas, alphas_cumprod).
        prediction_type: what the backbone predicts: "epsilon", "v_prediction" or "sample".
    """

    def __init__(self, scheduler, prediction_type: str):
        self.prediction_type = prediction_type
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        betas = scheduler.betas.double()
        alpha_bar = scheduler.alphas_cumprod.double()
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.alpha_bar = alpha_bar
        self.log_beta = torch.log(betas)  # the upper bound
        self.log_posterior_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))  # the lower, clipped
        self.coef_x0 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)  # the posterior mean's coefficients
        self.coef_xt = (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as (B, 1, ..., 1) float32 on `like`'s device (each table is copied there once)."""
        key = (id(values), like.device)
        if key not in self._on_device:
            self._on_device[key] = values.float().to(like.device)
        return self._on_device[key][t].view(-1, *[1] * (like.dim() - 1))

    def log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 from the variance values v (B, C, h, w) at integer timesteps t (B,)."""
        frac = (v.float() + 1.0) / 2.0
        return frac * self._at(self.log_beta, t, v) + (1.0 - frac) * self._at(self.log_posterior_var, t, v)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x0)."""
        return self._at(self.coef_x0, t, x0) * x0 + self._at(self.coef_xt, t, x0) * x_t

    def predicted_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the backbone's prediction of the objective's target (epsilon, v or x0), unclipped."""
        a = self._at(self.alpha_bar, t, x_t).sqrt()
        s = (1.0 - self._at(self.alpha_bar, t, x_t)).sqrt()
        kind = self.prediction_type
        if kind == "epsilon":
            return (x_t - s * prediction) / a
        if kind == "v_prediction":
            return a * x_t - s * prediction
        return prediction

    def vb_term(
        self, prediction: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_vb (B,) in bits per dimension, with the prediction frozen: only `v` gets a gradient."""
        x0, x_t = x0.float(), x_t.float()
        mean = self.posterior_mean(self.predicted_x0(prediction.detach().float(), x_t, t), x_t, t)
        log_var = self.log_variance(v, t)
        true_mean = self.posterior_mean(x0, x_t, t)
        true_log_var = self._at(self.log_posterior_var, t, x0).expand_as(x0)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)  # (B,)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)  # (B,)
