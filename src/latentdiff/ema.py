"""Exponential moving average of a backbone's weights (one EMA for the whole project)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds `model`, a frozen copy of the backbone, updated as ema <- ema + (1 - d) * (w - ema).

    The copy is a submodule, so it moves with the LightningModule and is saved in its checkpoint; it is
    never given to the optimizer.

    Args:
        backbone: the trained network; copied once at construction.
        decay: target decay d (U-ViT and DiT use 0.9999).
        warmup: ramp the decay as min(d, (1 + n) / (10 + n)) over updates n, so short runs are not
            dominated by the initial weights (diffusers' EMAModel does the same).
        update_every: update once every this many optimizer steps.
        start_step: copy the weights (decay 0) until this optimizer step.

    The ranges (`module.ema.*`) are checked with the run config (`latentdiff.rules`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        start_step: int = 0,
    ):
        super().__init__()
        self.model = copy.deepcopy(backbone).eval().requires_grad_(False)
        for p in self.model.parameters():
            p.grad = None  # a copied .grad would also make torch._foreach_lerp_ take a slow path (~300x on CPU)
        self.decay, self.warmup = float(decay), warmup
        self.update_every, self.start_step = int(update_every), int(start_step)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # the EMA copy always runs in eval mode (no dropout)

    @torch.no_grad()
    def update(self, backbone: nn.Module, step: int, apply: torch.Tensor | None = None) -> None:
        """Blend `backbone` into the EMA copy after optimizer step `step` (0-based).

        Runs on the device without reading any value back (no host-device sync): the warm-up decay is computed
        from the update count on the device, and `apply` (a bool tensor, e.g. "this step's gradients were
        finite") turns the update into a no-op without the host knowing which.
        """
        if step % self.update_every:
            return
        if step < self.start_step:
            weight: float | torch.Tensor = 1.0  # copy the weights
        elif self.warmup:
            n = self.num_updates.double()
            weight = (1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)).float()  # as the float path rounds
        else:
            weight = 1.0 - self.decay
        if apply is not None:
            weight = apply.float() * weight
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(backbone.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, weight)  # one fused kernel over all tensors
        for e, b in zip(self.model.buffers(), backbone.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1 if apply is None else apply.long()
