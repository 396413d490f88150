"""The interface every training objective implements, and the loss that the denoising objectives share.

An objective wraps the diffusers scheduler that defines its training (`scheduler`) and is the only thing the
LightningModule asks for a loss. Its siblings: `gaussian.GaussianDiffusion`, `flow.FlowMatching` (float latents,
MSE on a regression target) and `masked_tokens.MaskedTokens` (VQ token ids, cross-entropy at masked positions).

What the LightningModule calls:
    loss(model, x0, cond, t=None, eps=None, generator=None) -> (mean loss, per-sample loss (B,))
    sample_timesteps(batch_size, device, generator) and draw_noise(shape, generator): the draws of `loss`,
        made by the caller for a fixed validation batch.
What a sampler needs (`latentdiff.samplers`):
    scheduler        the training scheduler, whose config the sampling scheduler copies
    input_kind       "latents" (float (B, C, h, w): the denoising loop) or "tokens" (ids (B, h, w): the unmasking
                     loop); the backbone and the autoencoder of a run must take / give the same kind
    sampler_problem  which diffusers sampling schedulers fit (the one compatibility check, `samplers.fit`)
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from latentdiff.models.contract import Backbone, learns_variance

Generators = torch.Generator | list[torch.Generator] | None


class Objective(ABC):
    """A training objective around a diffusers scheduler (see the module docstring).

    Class attributes:
        kind: what it trains, in the words of an error ("Gaussian diffusion", "flow-matching", "masked-token").
        input_kind: "latents" or "tokens" (what x0 is).
        scheduler_class: the diffusers class of its training scheduler (`objective_for` finds an objective by it).
    """

    kind: ClassVar[str]
    input_kind: ClassVar[str]
    scheduler_class: ClassVar[type]
    prediction_type: str
    scheduler: Any

    @abstractmethod
    def loss(
        self,
        model: Backbone,
        x0: torch.Tensor,
        cond: torch.Tensor | None,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss (scalar) of `model` on x0 and the per-sample loss (B,), detached."""

    @abstractmethod
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The timesteps (B,) `loss` draws when none are given."""

    @abstractmethod
    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise `loss` draws when none is given, on the generator's device (CPU when None)."""

    def heldout_loss(self, model: Backbone, x0: torch.Tensor, cond: torch.Tensor | None, generator: torch.Generator):
        """The mean loss of `model` on x0 with timesteps and noise drawn from the CPU `generator` (seeded by the
        caller, e.g. by the batch index): values at different steps, or of different runs, compare."""
        t = self.sample_timesteps(x0.shape[0], torch.device("cpu"), generator).to(x0.device)
        eps = self.draw_noise(x0.shape, generator).to(x0.device)  # Gaussian eps, or masking noise u
        return self.loss(model, x0, cond, t=t, eps=eps)[0]

    @classmethod
    @abstractmethod
    def takes_sampler(cls, scheduler_class: type) -> bool:
        """Whether a diffusers scheduler class can sample a model trained with this objective."""

    @classmethod
    def sampler_problem(cls, scheduler_class: type, train_config: Mapping[str, Any]) -> str | None:
        """Why `scheduler_class` cannot sample a model trained with this objective and the training scheduler
        config `train_config`, as the end of a sentence that starts with the sampler's name; None when it can."""
        if not cls.takes_sampler(scheduler_class):
            return f"cannot sample a {cls.kind} model (diffusion={cls.__name__})"
        return None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Check the numbers of a composed run config that this objective ties together (none by default).

        Raises:
            ValueError: one line naming the key, the value and what to set.
        """
        return None


class DenoisingObjective(Objective):
    """What the objectives on float latents share: the loss is the (weighted) MSE between the backbone's output
    on the noised input and the objective's target. Subclasses define `noisy`, `model_timesteps`, `target`,
    `loss_weight` and `sample_timesteps`."""

    input_kind = "latents"

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
        out = model(x_t, self.model_timesteps(t), cond)  # (B, C, h, w), or (B, 2C, h, w) with learned variance
        pred = out[:, : x0.shape[1]]  # (B, C, h, w): the prediction of the target
        target = self.target(x0, eps, t)
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        loss = self.loss_weight(t) * mse + self.extra_loss(pred, target)  # (B,)
        if learns_variance(model):  # 2C channels: the prediction, then the variance values
            loss = loss + self.variance_loss(pred, out[:, x0.shape[1] :], x0, x_t, t)  # (B,)
        elif out.shape[1] != x0.shape[1]:
            raise ValueError(
                f"the backbone returns {out.shape[1]} channels for {x0.shape[1]}-channel latents; set its output "
                "channels to the data's (data.latent_channels)"
            )
        return loss.mean(), mse.detach()

    def extra_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A term (B,) added to the weighted MSE of the prediction (B, C, h, w); none by default."""
        return torch.zeros(pred.shape[0], device=pred.device)

    def variance_loss(
        self, pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The loss (B,) that trains a learned variance `v` (B, C, h, w); none by default: the channels are
        unused (SiT trains the velocity only)."""
        return torch.zeros(x0.shape[0], device=x0.device)

    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps: standard normal noise of `shape`, drawn on the generator's device (CPU when None)."""
        where = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=where)

    @abstractmethod
    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, the backbone's input at t."""

    @abstractmethod
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the backbone sees for t."""

    @abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the backbone learns to predict."""

    @abstractmethod
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,) of the MSE."""


def takes_argument(scheduler_class: type, name: str) -> bool:
    """Whether a diffusers scheduler class's constructor takes `name` (e.g. `beta_schedule`)."""
    return name in inspect.signature(scheduler_class.__init__).parameters
