"""Images from a model by sample index: the one sampler that `sample.py`, the FID callback and the sample grids
share, for every objective. The objective's `input_kind` picks the loop (`samplers.loop` for latents,
`samplers.unmask` for token ids) and how the autoencoder decodes its result; seeds: `samplers.seeds`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from latentdiff.objectives import objective_for
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.samplers.loop import sample_loop
from latentdiff.samplers.seeds import initial_noise, step_generators
from latentdiff.samplers.unmask import unmask_loop


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, H, W, 3) uint8, rounded as torchvision's `save_image` rounds."""
    return ((images.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


class ImageSampler:
    """Turns sample indices (and their conditions) into uint8 images.

    Args:
        backbone: the network to sample (usually the EMA copy), in eval mode.
        autoencoder: decodes latents (or VQ token ids) to images in [-1, 1] (the identity for pixel-space runs).
        train_scheduler: the training objective's scheduler, whose config the sampling scheduler copies (and
            which names the objective: `objectives.objective_for`).
        scheduler: partial building the sampling scheduler from that config (`conf/sampler/*.yaml`).
        steps: solver (or unmasking) steps.
        latent_shape: (C, h, w) of the backbone input; a token backbone reads the (h, w) grid of ids.
        null_cond: maps a batch of conditions to the unconditional input (class ids -> null class).
        guidance_scale: CFG w (1: none).
        guidance_interval: (low, high) training timesteps where guidance is applied; None: everywhere.
        step_kwargs: extra `scheduler.step` arguments (e.g. DDIM's eta), or the unmasking loop's `temperature`
            and `starting_mask_ratio`.
        seed: the run seed of `samplers.seeds.index_generator`.

    Raises:
        ValueError: the sampler cannot sample the objective (`samplers.fit.check_fits`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        autoencoder: nn.Module,
        train_scheduler: Any,
        scheduler: Callable,
        steps: int,
        latent_shape: Sequence[int],
        null_cond: Callable[[torch.Tensor | None], torch.Tensor | None],
        guidance_scale: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
        step_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        make_sampling_scheduler(scheduler, train_scheduler)  # fail before the first sample
        self.input_kind = objective_for(train_scheduler).input_kind
        self.backbone, self.autoencoder = backbone, autoencoder
        self.train_scheduler, self.scheduler_partial = train_scheduler, scheduler
        self.steps, self.latent_shape, self.null_cond = int(steps), tuple(latent_shape), null_cond
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = tuple(guidance_interval) if guidance_interval is not None else None
        self.step_kwargs, self.seed = dict(step_kwargs or {}), int(seed)
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are (samples are made there)."""
        if self._device is None:
            self._device = next(self.backbone.parameters()).device
        return self._device

    @torch.no_grad()
    def latents(self, indices: Sequence[int], cond: torch.Tensor | None = None) -> torch.Tensor:
        """Sampled latents (B, C, h, w), or token ids (B, h, w), of `indices`; `cond` is (B,) class ids,
        (B, L, D) text features or None."""
        device = self.device
        cond = cond.to(device) if cond is not None else None
        scheduler = make_sampling_scheduler(self.scheduler_partial, self.train_scheduler)
        loop = _LOOPS[self.input_kind]
        return loop(self, scheduler, indices, cond, step_generators(indices, self.seed, device))

    def _denoise(self, scheduler: Any, indices: Sequence[int], cond: torch.Tensor | None, generators: list) -> Any:
        noise = initial_noise(indices, self.latent_shape, self.seed).to(self.device)  # (B, C, h, w)
        return sample_loop(
            self.backbone,
            scheduler,
            noise,
            self.steps,
            cond=cond,
            null_cond=self.null_cond(cond),
            guidance_scale=self.guidance_scale,
            guidance_interval=self.guidance_interval,
            generator=generators,
            step_kwargs=self.step_kwargs,
        )

    def _unmask(self, scheduler: Any, indices: Sequence[int], cond: torch.Tensor | None, generators: list) -> Any:
        return unmask_loop(
            self.backbone,
            scheduler,
            (len(indices), *self.latent_shape[-2:]),
            self.steps,
            cond=cond,
            null_cond=self.null_cond(cond),
            guidance_scale=self.guidance_scale,
            generator=generators,
            device=self.device,
            **self.step_kwargs,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of latents (decoded in float32) or token ids (by the VQ model in its own
        dtype), outside any autocast of the backbone."""
        with torch.autocast(latents.device.type, enabled=False):
            return to_uint8(self.autoencoder.decode_output(latents).clamp(-1, 1))

    @torch.no_grad()
    def images(self, indices: Sequence[int], cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of `indices` on the CPU."""
        return self.decode(self.latents(indices, cond))


# by the objective's input kind: the loop that samples it
_LOOPS = {"latents": ImageSampler._denoise, "tokens": ImageSampler._unmask}


def module_sampler(
    pl_module: Any, scheduler: Callable, steps: int, guidance_scale: float = 1.0, **kwargs: Any
) -> ImageSampler:
    """An `ImageSampler` of a `DiffusionModule`'s sampling (EMA) backbone; kwargs as `ImageSampler`."""
    shape = getattr(pl_module, "latent_shape", None)
    if shape is None:
        raise ValueError("the module has no latent_shape; run_training sets it from data.latent_size")
    return ImageSampler(
        pl_module.sampling_backbone,
        pl_module.autoencoder,
        pl_module.diffusion.scheduler,
        scheduler,
        steps,
        shape,
        pl_module.null_cond,
        guidance_scale=guidance_scale,
        **kwargs,
    )
