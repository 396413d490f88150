"""The condition of each sample index: a class id (drawn per index, balanced or given) or a caption of a text
latent store (`PromptSet`); and the check that a text store's rows fit a text-conditional token backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from latentdiff.samplers.seeds import LABEL, index_generator

LABEL_MODES = ("uniform", "balanced")


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
        """The caption of each sample index."""
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
