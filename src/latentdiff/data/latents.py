"""Datamodule over a latent store: memory-mapped shards, a random flip and caption per item each step.

A batch is `{"moments": (B, 2C, h, w) fp16, "cond": (B,) int64 class ids | (B, L, D) fp16 text features,
"index": (B,) int64}`; the module draws z = scale * (mean + std * eps) from the moments (a fresh posterior
sample every step, as official U-ViT does). A VQ token store gives `"tokens": (B, h, w) int64` instead of
moments. Items are read a whole batch at a time (`__getitems__`): one
sorted fancy-indexing copy per shard instead of B Python calls.
"""

from __future__ import annotations

import logging
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latentdiff.autoencoder import same_encoder
from latentdiff.data.order import key_uniform, split_item, train_loader
from latentdiff.data.store import LatentStore, StoreError, verify_store

log = logging.getLogger(__name__)


def _batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for datasets with `__getitems__`: the batch is already collated."""
    return batch


class LatentDataset(Dataset):
    """Items `indices` of a store.

    Args:
        store: the opened store.
        indices: global item indices this dataset serves.
        random_views: draw the flip and the caption at random (training); else image 0 and caption 0.
        labels: return class ids as `cond` (class-conditional runs).
        text: return text features as `cond` (text-to-image runs).
    """

    def __init__(
        self, store: LatentStore, indices: np.ndarray, random_views: bool, labels: bool, text: bool, flip: bool = True
    ):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        self.random_views, self.labels, self.text = random_views, labels, text
        self.views = store.meta["views"] if flip else 1  # view 0: the image, 1: its horizontal flip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([item]).items()}

    def __getitems__(self, items: list[int] | list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        pairs = [split_item(item) for item in items]
        index = self.indices[np.array([i for i, _ in pairs], dtype=np.int64)]  # (B,)
        shard, local = self.store.locate(index)
        b = len(index)
        # random views from each item's draw key (the training sampler's), never from a worker's RNG state:
        # a batch is the same on any number of workers and after a resume
        random = self.random_views and all(k is not None for _, k in pairs)
        keys = np.array([k for _, k in pairs], dtype=np.uint64) if random else None
        view = (
            np.minimum((key_uniform(keys, 1) * self.views).astype(np.int64), self.views - 1)
            if random
            else np.zeros(b, dtype=np.int64)
        )
        first = self.store.shards[0]
        key = "tokens" if self.store.holds_tokens else "moments"
        stored = getattr(first, key)  # (n, F, 2C, h, w) moments or (n, F, h, w) token ids
        latents = np.empty((b, *stored.shape[2:]), dtype=stored.dtype)  # (B, 2C, h, w) or (B, h, w)
        labels = np.empty(b, dtype=np.int64) if self.labels else None
        text = np.empty((b, *first.text.shape[1:]), dtype=first.text.dtype) if self.text else None
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            rows = rows[np.argsort(local[rows], kind="stable")]  # ascending reads from the memory map
            arrays, loc = self.store.shards[s], local[rows]
            latents[rows] = getattr(arrays, key)[loc, view[rows]]
            if labels is not None:
                labels[rows] = arrays.labels[loc]
            if text is not None:
                start, stop = arrays.text_offsets[loc], arrays.text_offsets[loc + 1]
                draw = key_uniform(keys[rows], 2) if random else np.zeros(len(rows))
                pick = start + np.floor(draw * (stop - start)).astype(np.int64)  # one caption of each image
                text[rows] = arrays.text[pick]
        if key == "tokens":
            latents = latents.astype(np.int64)  # uint16 on disk; embedding lookups and CE targets take int64
        batch = {key: torch.from_numpy(latents), "index": torch.from_numpy(index)}
        if labels is not None:
            batch["cond"] = torch.from_numpy(labels)
        if text is not None:
            batch["cond"] = torch.from_numpy(text)
        return batch


def _verified(root: str, key: str) -> None:
    """`verify_store` with the config key in its error (a damaged file is named, one line)."""
    from pathlib import Path

    try:
        result = verify_store(Path(root))
    except StoreError as err:
        raise StoreError(
            f"{key}={root} failed verification: {err}; extract the store again (a re-run repairs it)"
        ) from None
    log.info(
        "%s=%s verified: %d shards, %.2f GB in %.1f s",
        key,
        root,
        result["shards"],
        result["bytes"] / 1e9,
        result["seconds"],
    )


class LatentDataModule(L.LightningDataModule):
    """Training data from a latent store made by `python -m latentdiff.extract`.

    The store is opened and checked when the datamodule is built, before any work: its resolution, latent
    shape, classes and text features must match the run, and `check_autoencoder` compares its encoder and
    scaling factor with the run's VAE.

    Args:
        root: the store folder.
        image_size: resolution the run expects the store to have (pixels).
        num_classes: classes of a class-conditional run (the store's count); 0 for unconditional or text runs.
        text: a text-to-image run (the store must hold text features).
        batch_size: the global batch (one optimizer step over all ranks); `run_training` sets each rank's share.
        num_workers: loader processes (0: in the main process).
        in_memory: read the shards into RAM instead of memory-mapping them.
        random_flip: use the stored horizontal flip with probability 1/2.
        pin_memory: page-locked batches for fast, non-blocking copies to the GPU.
        val_root: a separate store for the held-out loss (e.g. ImageNet val); default: the training store.
        num_val: items of the held-out loss (the first ones, no flip, first caption).
        shuffle_seed: seed of the training order and of each item's flip and caption (the run's `seed`).
        latent_size, latent_channels, channels, text_dim, text_len: the shape facts the backbone reads.
        verify: recompute every checksum of the store(s) before training (`python -m latentdiff.verify`
            does the same on its own; it reads the whole store once, about 1.4 GB/s).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        num_classes: int = 0,
        text: bool = False,
        batch_size: int = 256,
        num_workers: int = 4,
        in_memory: bool = False,
        random_flip: bool = True,
        pin_memory: bool = True,
        val_root: str | None = None,
        num_val: int = 1024,
        shuffle_seed: int = 0,
        latent_size: int | None = None,
        latent_channels: int | None = None,
        channels: int = 3,
        text_dim: int | None = None,
        text_len: int | None = None,
        verify: bool = False,
    ):
        super().__init__()
        self.batch_size, self.num_workers, self.pin_memory = int(batch_size), int(num_workers), bool(pin_memory)
        self.num_classes, self.text, self.random_flip, self.num_val = int(num_classes), bool(text), random_flip, num_val
        self.shuffle_seed = int(shuffle_seed)
        if verify and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:  # one process per node reads it all
            for key, folder in (("data.root", root), ("data.val_root", val_root)):
                if folder is not None:
                    _verified(folder, key)
        self.store = LatentStore(root, in_memory=in_memory, key="data.root")
        self.val_store = self.store if val_root is None else LatentStore(val_root, in_memory, key="data.val_root")
        for key, store in (("data.root", self.store), ("data.val_root", self.val_store)):
            self._check_store(key, store, image_size, latent_size, latent_channels, text_dim, text_len)
            self._check_labels(key, store)
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if self.batch_size > len(self.store):
            raise ValueError(f"data.batch_size={batch_size} exceeds the {len(self.store)} items of data.root={root}")

    def _check_store(self, key, store, image_size, latent_size, latent_channels, text_dim, text_len) -> None:
        meta, where = store.meta, f"{key}={store.root}"
        if meta["resolution"] != image_size:
            raise ValueError(
                f"{where} holds {meta['resolution']}px latents but data.image_size={image_size}; "
                f"set data.image_size={meta['resolution']} or extract at {image_size}"
            )
        c, h, w = meta["latent_shape"]
        if meta.get("tokens"):  # ids (h, w): no channels to compare
            if latent_size is not None and h != latent_size:
                raise ValueError(
                    f"{where} holds {h}x{w} VQ token ids but the run expects {latent_size}x{latent_size} "
                    "(vae and data.image_size); use the store's VQ model (vae=vq_*) and its resolution"
                )
        elif latent_channels is not None and latent_size is not None and (c, h) != (latent_channels, latent_size):
            raise ValueError(
                f"{where} holds {c}x{h}x{w} latents but the run expects "
                f"{latent_channels}x{latent_size}x{latent_size} (vae and data.image_size)"
            )
        self._check_classes_and_text(where, meta, text_dim, text_len)

    def _check_labels(self, key: str, store: LatentStore) -> None:
        """Class ids must be in [0, num_classes): an id beyond would index past the class table mid-training."""
        if self.num_classes <= 0:
            return
        for i, shard in enumerate(store.shards):
            labels = shard.labels
            if labels is None or not len(labels):
                continue
            low, high = int(labels.min()), int(labels.max())  # (n,) int64: small, read once
            if low < 0 or high >= self.num_classes:
                bad = high if high >= self.num_classes else low
                raise ValueError(
                    f"{key}={store.root}: shard {i} holds class id {bad}, outside [0, {self.num_classes}) "
                    f"(data.num_classes={self.num_classes}); the store's labels do not match its store.json"
                )

    def _check_classes_and_text(self, where: str, meta: dict, text_dim: int | None, text_len: int | None) -> None:
        if self.num_classes > 0:
            if not meta.get("num_classes"):
                raise ValueError(f"{where} has no class labels but data.num_classes={self.num_classes}; use 0")
            if meta["num_classes"] != self.num_classes:
                raise ValueError(
                    f"{where} has {meta['num_classes']} classes but data.num_classes={self.num_classes}; "
                    f"set data.num_classes={meta['num_classes']}"
                )
        if self.text:
            if not meta.get("text"):
                raise ValueError(f"{where} holds no text features but data.text=true; extract it with a text_encoder")
            dim, length = meta["text"]["dim"], meta["text"]["max_length"] + int(bool(meta["text"].get("pooled")))
            if (text_dim, text_len) != (dim, length) and text_dim is not None:
                raise ValueError(
                    f"{where} holds {length}x{dim} text features but data.text_len/text_dim are "
                    f"{text_len}x{text_dim}; set them to {length} and {dim}"
                )

    def check_autoencoder(self, autoencoder) -> None:
        """Refuse a store whose moments come from another encoder or another scaling factor than the run's, or
        whose token ids come from another VQ model (or codebook)."""
        run, made = autoencoder.describe(), self.store.meta["vae"]
        tokens_run = run["kind"] == "VQModel"
        if tokens_run != self.store.holds_tokens:
            held, want = ("VQ token ids", "VAE moments") if self.store.holds_tokens else ("VAE moments", "VQ token ids")
            raise ValueError(
                f"data.root={self.store.root} holds {held} but the run's vae ({run.get('pretrained', run['kind'])}) "
                f"needs {want}; use vae={'vq_*' if self.store.holds_tokens else 'sd_ema or none'} or another store"
            )
        if tokens_run and made.get("codebook_size") != run["codebook_size"]:
            raise ValueError(
                f"data.root={self.store.root} holds ids of a {made.get('codebook_size')}-code codebook but the run's "
                f"VQ model has {run['codebook_size']} codes; use the VQ model of the store or extract again"
            )
        if not same_encoder(made, run):
            raise ValueError(
                f"data.root={self.store.root} was made with another VAE encoder "
                f"({made.get('pretrained', made['kind'])}) than the run's ({run.get('pretrained', run['kind'])}); "
                "use the VAE of the store or extract again"
            )
        if not tokens_run and abs(made["scaling_factor"] - run["scaling_factor"]) > 1e-6:
            raise ValueError(
                f"data.root={self.store.root} was made for scaling factor {made['scaling_factor']} but "
                f"the run's VAE uses {run['scaling_factor']}; set vae.scaling_factor={made['scaling_factor']}"
            )

    @property
    def empty_text(self) -> torch.Tensor | None:
        """(L, D) features of the empty prompt (the null condition of text runs), or None."""
        e = self.store.empty_text
        return None if e is None or not self.text else torch.from_numpy(np.asarray(e, dtype=np.float32))

    def prompts(self, count: int) -> tuple[torch.Tensor, list[str]]:
        """The first caption of the first `count` held-out items: (count, L, D) fp32 features and the captions."""
        count = min(count, len(self.val_store))
        dataset = LatentDataset(self.val_store, np.arange(count), False, labels=False, text=True)
        features = dataset.__getitems__(list(range(count)))["cond"].float()
        return features, [self.val_store.captions(i)[0] for i in range(count)]

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "collate_fn": _batched,
        }

    def train_dataloader(self) -> DataLoader:
        """The resumable training order (`latentdiff.data.order`) from the run's seed, split over ranks."""
        dataset = LatentDataset(
            self.store,
            np.arange(len(self.store)),
            True,
            labels=self.num_classes > 0,
            text=self.text,
            flip=self.random_flip,
        )
        return train_loader(self, dataset, self.batch_size, self.shuffle_seed, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        count = min(self.num_val, len(self.val_store))
        dataset = LatentDataset(self.val_store, np.arange(count), False, labels=self.num_classes > 0, text=self.text)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **self._loader_options())
