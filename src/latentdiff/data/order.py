"""The training order: resumable mid-epoch, the same on any number of workers, split over ranks.

`EpochSampler` draws one permutation of the dataset per epoch from `(seed, epoch)` and gives rank r every
world-th item of it (as `DistributedSampler`, which it subclasses, so Lightning does not wrap it). Each item
comes with a *draw key*, a 64-bit number derived from `(seed, epoch, position)`, that seeds the item's own
randomness (the stored flip, the caption); so what a batch holds never depends on which worker loaded it,
on worker RNG states, or on where a run was resumed.

`ResumableLoader` is a `DataLoader` with Lightning's `state_dict` / `load_state_dict` interface: Lightning
stores `{"epoch", "batches"}` in every checkpoint and gives it back on resume, before the first iterator is
made, so the resumed epoch goes on from the next unseen batch. The count of consumed batches comes from the
trainer's loop (not from the iterator, which Lightning prefetches ahead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from latentdiff.lightning_internals import batches_processed

_MASK = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps); equal inputs give equal keys on every machine."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h


def split_item(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """(index, draw key) of a sampler item; plain indices (evaluation loaders) have no key."""
    if isinstance(item, tuple):
        return int(item[0]), int(item[1])
    return int(item), None


def key_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """Uniform floats in [0, 1) from draw keys (one independent stream per `salt`)."""
    return np.array([mix64(k, salt) >> 11 for k in keys], dtype=np.float64) / float(1 << 53)


class EpochSampler(DistributedSampler):
    """Per-epoch permutation of `len(dataset)` items from `(seed, epoch)`, rank r taking positions r, r + W, ...

    Args:
        dataset: anything with `__len__`.
        num_replicas, rank: the data-parallel world (1, 0 on one device).
        shuffle: permute each epoch (else the natural order).
        seed: the run's seed.
        drop_last: drop the tail that does not split evenly over the ranks (else pad by wrapping around).

    Yields:
        `(index, draw_key)` pairs.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0  # items of this rank's share of the current epoch already consumed (resume)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch; a resumed epoch keeps its position, a new one starts at 0."""
        if int(epoch) != self.epoch:
            self.epoch, self.skip = int(epoch), 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue epoch `epoch` after its first `consumed` items of this rank."""
        self.epoch, self.skip = int(epoch), int(consumed)

    def order(self) -> np.ndarray:
        """This rank's item indices of the current epoch, in order."""
        n = len(self.dataset)
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch])))
            perm = rng.permutation(n)
        else:
            perm = np.arange(n)
        # drop the uneven tail, or pad by wrapping around
        perm = perm[: self.total_size] if self.drop_last else np.resize(perm, self.total_size)
        return perm[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.order()
        base = self.rank  # position of this rank's first item in the epoch's permutation
        for j in range(self.skip, len(mine)):
            yield int(mine[j]), mix64(self.seed, self.epoch, base + j * self.num_replicas)


class ResumableLoader(DataLoader):
    """A training `DataLoader` over an `EpochSampler` whose position Lightning checkpoints and restores.

    Args:
        dataset: the training dataset (items are `(index, draw_key)` pairs).
        sampler: its `EpochSampler`.
        batch_size: per-device batch.
        consumed: returns the number of batches of the current epoch the trainer has processed; None
            before a trainer is attached (the state then says 0).
        **kwargs: the other `DataLoader` arguments (workers, pin_memory, collate_fn, ...).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: EpochSampler,
        batch_size: int,
        consumed: Callable[[], int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.consumed = consumed

    def state_dict(self) -> dict[str, int]:
        batches = self.consumed() if self.consumed is not None else 0
        return {
            "epoch": self.sampler.epoch,
            "batches": int(batches),
            "batch_size": int(self.batch_size),
            "world_size": int(self.sampler.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # the batch size and world size are the checkpoint's (run_training checks them before fitting)
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # the checkpoint ended the epoch: the next one starts fresh
            epoch, batches = epoch + 1, 0
        self.sampler.resume(epoch, batches * self.batch_size)


def lightning_consumed(datamodule: Any) -> Callable[[], int]:
    """Batches of the current epoch the datamodule's trainer has processed (0 without a trainer)."""

    def consumed() -> int:
        trainer = getattr(datamodule, "trainer", None)
        if trainer is None:
            return 0
        return batches_processed(trainer)

    return consumed


def data_world(datamodule: Any) -> tuple[int, int]:
    """(world size, rank) of the datamodule's trainer; (1, 0) without one."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def train_loader(datamodule: Any, dataset: Any, batch_size: int, seed: int, **kwargs: Any) -> ResumableLoader:
    """The resumable training loader of a datamodule: its order from `seed`, split over the trainer's ranks."""
    world, rank = data_world(datamodule)
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(
            f"data.batch_size={batch_size} is larger than the {len(sampler)} training items per device; "
            f"use at most {len(sampler)}"
        )
    return ResumableLoader(dataset, sampler, batch_size, consumed=lightning_consumed(datamodule), **kwargs)


def generator_for(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from a tuple of integers (e.g. seed, rank, step, batch)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix64(*key) & ((1 << 63) - 1))
    return generator


def batch_items(batch: Any) -> int:
    """Items in a training batch (a dict of tensors): what the `Throughput` callback counts."""
    if isinstance(batch, dict):
        first = batch["index"] if "index" in batch else next(v for v in batch.values() if torch.is_tensor(v))
        return int(first.shape[0])
    return int(batch.shape[0])
