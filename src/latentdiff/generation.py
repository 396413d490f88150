"""Images from a model by sample index: per-index seeds, the sampler that `sample.py`, the FID callback and
the sample grids share, and the condition (class id, COCO caption) of each index.

Seeds: sample `i` of a run with seed `s` draws its start noise, its class (when drawn at random) and the
noise of stochastic solver steps from generators seeded by `SeedSequence([s, i, stream])`. An image depends
only on (model, sampler, s, i): not on the batch size, the number of processes or which process made it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from latentdiff.diffusion import make_sampling_scheduler, sample_loop

NOISE, LABEL, STEP = 0, 1, 2  # generator streams of one sample index
LABEL_MODES = ("uniform", "balanced")


def index_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for (run seed, sample index, stream), well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def initial_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """(B, *shape) float32 standard normal start noise on the CPU, one generator per sample index."""
    return torch.stack([torch.randn(tuple(shape), generator=index_generator(seed, i, NOISE)) for i in indices])


def class_labels(indices: Sequence[int], num_classes: int, seed: int, labels: Any = "uniform") -> torch.Tensor:
    """(B,) int64 class ids of sample indices.

    Args:
        labels: "uniform" (a random class per index, as ADM/DiT/U-ViT sample 50K ImageNet images),
            "balanced" (index mod num_classes), one class id, or a list of ids (index mod its length).
    """
    if isinstance(labels, str):
        if labels == "uniform":
            draws = [torch.randint(0, num_classes, (1,), generator=index_generator(seed, i, LABEL)) for i in indices]
            return torch.cat(draws) if draws else torch.zeros(0, dtype=torch.long)
        return torch.as_tensor([i % num_classes for i in indices], dtype=torch.long)
    given = [int(labels)] if isinstance(labels, int) else [int(v) for v in labels]
    return torch.as_tensor([given[i % len(given)] for i in indices], dtype=torch.long)


def check_labels(labels: Any, num_classes: int) -> None:
    """Raise one line when `labels` (the `labels` option of sample.py) is not valid for `num_classes`."""
    if isinstance(labels, str):
        if labels not in LABEL_MODES:
            raise ValueError(f"labels={labels!r} is not supported; use uniform, balanced, a class id or a list of ids")
        return
    given = [labels] if isinstance(labels, int) else list(labels)
    bad = [v for v in given if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_classes]
    if not given or bad:
        raise ValueError(f"labels={labels} must be class ids in [0, {num_classes}) (or uniform / balanced)")


def check_sampler(scheduler: Callable, train_scheduler: Any, guidance_interval: Sequence[float] | None) -> None:
    """Raise one line when the sampler cannot follow the training objective or its guidance interval is wrong."""
    if guidance_interval is not None and (len(guidance_interval) != 2 or guidance_interval[0] > guidance_interval[1]):
        raise ValueError(f"sampler.guidance_interval={list(guidance_interval)} must be [low, high] with low <= high")
    make_sampling_scheduler(scheduler, train_scheduler)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, H, W, 3) uint8, rounded as torchvision's `save_image` rounds."""
    return ((images.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


class ImageSampler:
    """Turns sample indices (and their conditions) into uint8 images.

    Args:
        backbone: the network to sample (usually the EMA copy), in eval mode.
        autoencoder: decodes latents to images in [-1, 1] (the identity for pixel-space runs).
        train_scheduler: the training objective's scheduler, whose config the sampling scheduler copies.
        scheduler: partial building the sampling scheduler from that config (`conf/sampler/*.yaml`).
        steps: solver steps.
        latent_shape: (C, h, w) of the backbone input.
        null_cond: maps a batch of conditions to the unconditional input (class ids -> null class).
        guidance_scale: CFG w (1: none).
        guidance_interval: (low, high) training timesteps where guidance is applied; None: everywhere.
        step_kwargs: extra `scheduler.step` arguments (e.g. DDIM's eta).
        seed: the run seed of `index_generator`.
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
        check_sampler(scheduler, train_scheduler, guidance_interval)
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
        """Sampled latents (B, C, h, w) of `indices`; `cond` is (B,) class ids, (B, L, D) text features or None."""
        device = self.device
        noise = initial_noise(indices, self.latent_shape, self.seed).to(device)  # (B, C, h, w)
        step_generators = [index_generator(self.seed, i, STEP) for i in indices]
        if device.type != "cpu":  # diffusers draws step noise on the generators' device
            step_generators = [torch.Generator(device).manual_seed(g.initial_seed()) for g in step_generators]
        cond = cond.to(device) if cond is not None else None
        return sample_loop(
            self.backbone,
            make_sampling_scheduler(self.scheduler_partial, self.train_scheduler),
            noise,
            self.steps,
            cond=cond,
            null_cond=self.null_cond(cond),
            guidance_scale=self.guidance_scale,
            guidance_interval=self.guidance_interval,
            generator=step_generators,
            step_kwargs=self.step_kwargs,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of latents, decoded in float32 (outside any autocast of the backbone)."""
        with torch.autocast(latents.device.type, enabled=False):
            return to_uint8(self.autoencoder.decode(latents.float()).clamp(-1, 1))

    @torch.no_grad()
    def images(self, indices: Sequence[int], cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of `indices` on the CPU."""
        return self.decode(self.latents(indices, cond))


class TokenSampler(ImageSampler):
    """An `ImageSampler` for masked-token models: iterative unmasking (`AmusedScheduler`, `latentdiff.masking`)
    from an all-mask grid to token ids, decoded by the VQ model.

    Arguments as `ImageSampler`; `latent_shape` is (..., h, w), the token grid; `step_kwargs` may hold
    `temperature` ([start, end] Gumbel temperature of the re-masking, `AmusedScheduler.set_timesteps`) and
    `starting_mask_ratio` (`AmusedScheduler.step`). Each sample's token draws come from its own generator
    (`index_generator(seed, i, STEP)`), so an image depends only on (model, sampler, seed, index).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        from latentdiff.masking import check_unmask_options

        super().__init__(*args, **kwargs)
        check_unmask_options(self.step_kwargs, self.guidance_interval)

    @torch.no_grad()
    def latents(self, indices: Sequence[int], cond: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, h, w) of `indices`; `cond` is (B,) class ids, (B, L, D) text features or None."""
        from latentdiff.masking import unmask_loop

        device = self.device
        generators = [index_generator(self.seed, i, STEP) for i in indices]
        if device.type != "cpu":  # diffusers draws on the generators' device
            generators = [torch.Generator(device).manual_seed(g.initial_seed()) for g in generators]
        cond = cond.to(device) if cond is not None else None
        return unmask_loop(
            self.backbone,
            make_sampling_scheduler(self.scheduler_partial, self.train_scheduler),
            (len(indices), *self.latent_shape[-2:]),
            self.steps,
            cond=cond,
            null_cond=self.null_cond(cond),
            guidance_scale=self.guidance_scale,
            generator=generators,
            device=device,
            **self.step_kwargs,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 images of token ids (B, h, w), decoded by the VQ model in its own dtype."""
        with torch.autocast(latents.device.type, enabled=False):
            return to_uint8(self.autoencoder.decode_tokens(latents).clamp(-1, 1))


def sampler_class(autoencoder: nn.Module) -> type[ImageSampler]:
    """`TokenSampler` for a VQ tokenizer (masked-token runs), else `ImageSampler`."""
    from latentdiff.autoencoder import is_tokenizer

    return TokenSampler if is_tokenizer(autoencoder) else ImageSampler


def module_sampler(pl_module, scheduler: Callable, steps: int, guidance_scale: float = 1.0, **kwargs) -> ImageSampler:
    """An `ImageSampler` (or `TokenSampler`) of a `DiffusionModule`'s sampling (EMA) backbone; kwargs as
    `ImageSampler`."""
    shape = getattr(pl_module, "latent_shape", None)
    if shape is None:
        raise ValueError("the module has no latent_shape; run_training sets it from data.latent_size")
    return sampler_class(pl_module.autoencoder)(
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


class PromptSet:
    """The captions of a text latent store as sampling conditions: sample i gets caption pair `order[i % n]`.

    Every (image, caption) pair of the store is a prompt; a fixed permutation (seed 0, independent of the
    sampling seed) spreads the first N samples over images, as COCO FID-30K draws 30K captions.

    Args:
        store: an opened `LatentStore` with text features.
    """

    def __init__(self, store):
        if not store.meta.get("text"):
            raise ValueError(f"prompts={store.root} holds no caption features (extract it with a text_encoder)")
        self.store = store
        pairs = []  # (shard, caption row, item, caption number)
        for s, shard in enumerate(store.shards):
            offsets = np.asarray(shard.text_offsets)
            for local in range(shard.count):
                for j, row in enumerate(range(offsets[local], offsets[local + 1])):
                    pairs.append((s, row, int(store.offsets[s]) + local, j))
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
        self.order = np.random.default_rng(0).permutation(len(self.pairs))
        self._captions: dict[int, list[list[str]]] = {}  # shard -> its captions.json

    def __len__(self) -> int:
        return len(self.pairs)

    def features(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, L, D) float32 text features of sample indices."""
        rows = self.pairs[self.order[np.asarray(indices, dtype=np.int64) % len(self.pairs)]]
        return torch.from_numpy(np.stack([np.asarray(self.store.shards[s].text[r]) for s, r, _, _ in rows])).float()

    def captions(self, indices: Sequence[int]) -> list[str]:
        rows = self.pairs[self.order[np.asarray(indices, dtype=np.int64) % len(self.pairs)]]
        out = []
        for s, _, item, j in rows:
            if s not in self._captions:
                self._captions[int(s)] = self.store.shard_captions(int(s))
            out.append(self._captions[int(s)][int(item - self.store.offsets[s])][int(j)])
        return out


def conditions_for(
    indices: Sequence[int], num_classes: int, seed: int, labels: Any = "uniform", prompts: PromptSet | None = None
) -> tuple[torch.Tensor | None, list[Any]]:
    """The conditions of sample indices and what to record for each (class id or caption)."""
    if prompts is not None:
        return prompts.features(indices), prompts.captions(indices)
    if num_classes > 0:
        ids = class_labels(indices, num_classes, seed, labels)
        return ids, ids.tolist()
    return None, [None] * len(indices)
