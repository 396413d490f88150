"""Built-in dataset: coloured shapes on a dark background, generated in memory from a seed.

Each class is one shape (circle, square, triangle, cross, ring, diamond); colour, size, position and
rotation are random. Images are rendered at 3x resolution and box-filtered down, so edges are
anti-aliased. Nothing is downloaded: the same seed gives the same images on every machine.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latentdiff.data.order import split_item, train_loader

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
RENDER_VERSION = 1  # raise it when `render_shapes` draws differently: the shapes judge's cache is keyed by it
_SUPERSAMPLE = 3


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside-mask of one shape kind for a batch, in rotated coordinates centred on each shape.

    Args:
        kind: shape id (index into `SHAPE_NAMES`).
        u, v: (N, S, S) coordinates relative to each shape's centre, already rotated.
        r: (N, 1, 1) half-size of each shape.

    Returns:
        (N, S, S) bool mask.
    """
    au, av = np.abs(u), np.abs(v)
    if kind == 0:  # circle
        return u * u + v * v <= r * r
    if kind == 1:  # square
        return np.maximum(au, av) <= 0.85 * r
    if kind == 2:  # upward triangle: above the base, below the two slanted edges
        return (v <= 0.5 * r) & (v >= -r + 1.732 * au)
    if kind == 3:  # cross
        return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))
    if kind == 4:  # ring
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    return au + av <= r  # diamond


def render_shapes(
    num_images: int, image_size: int = 32, num_classes: int = 4, seed: int = 0, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render `num_images` shapes with balanced classes.

    Args:
        num_images: how many images.
        image_size: side length in pixels.
        num_classes: how many shape kinds (the first `num_classes` of `SHAPE_NAMES`).
        seed: everything is a function of this seed.
        chunk: images rendered per vectorised step (memory bound).

    Returns:
        images (N, 3, H, W) uint8 and labels (N,) int64.
    """
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"data.num_classes={num_classes} is not supported by data=shapes; use 1..{len(SHAPE_NAMES)}")
    if image_size < 8:
        raise ValueError(f"data.image_size={image_size} is too small for data=shapes; use 8 or more")
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % num_classes
    rng.shuffle(labels)
    s = image_size * _SUPERSAMPLE
    grid = ((np.arange(s) + 0.5) / _SUPERSAMPLE).astype(np.float32)  # pixel centres in output-pixel units
    images = np.empty((num_images, 3, image_size, image_size), dtype=np.uint8)
    for start in range(0, num_images, chunk):
        kind = labels[start : start + chunk]
        n = len(kind)
        r = rng.uniform(0.18, 0.34, n) * image_size  # half-size
        cx = rng.uniform(r, image_size - r)
        cy = rng.uniform(r, image_size - r)
        theta = rng.uniform(-0.35, 0.35, n)  # small rotations keep the classes tell-apart
        hue = rng.uniform(0, 1, n)
        colour = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.75, 1.0, n))  # (n, 3)
        background = rng.uniform(0.0, 0.15, (n, 1)) * np.ones((1, 3))  # dark grey
        dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)  # (n, 1, S)
        dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)  # (n, S, 1)
        c = np.cos(theta)[:, None, None].astype(np.float32)
        sn = np.sin(theta)[:, None, None].astype(np.float32)
        u = c * dx + sn * dy  # (n, S, S)
        v = -sn * dx + c * dy
        mask = np.zeros((n, s, s), dtype=np.float32)
        for k in np.unique(kind):
            sel = kind == k
            mask[sel] = _shape_mask(int(k), u[sel], v[sel], r[sel, None, None])
        # box filter S -> image_size (anti-aliasing)
        cover = mask.reshape(n, image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(2, 4))
        img = background[:, :, None, None] + (colour - background)[:, :, None, None] * cover[:, None]
        images[start : start + n] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns (N, 3)."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)])  # (6, 3, N)
    return table[i, :, np.arange(len(h))]


class _TensorImages(Dataset):
    """uint8 images -> {"image": float in [-1, 1] (C, H, W), "cond": class id, "index": item index}.

    Items are indices or the `(index, draw_key)` pairs of the training sampler (shapes have no random views).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, _ = split_item(item)
        return {"image": self.images[i].float() / 127.5 - 1.0, "cond": self.labels[i], "index": torch.tensor(i)}


class ShapesDataModule(L.LightningDataModule):
    """Class-conditional shapes, generated in memory (no download).

    Args:
        image_size: side length in pixels.
        num_classes: number of shape kinds (1..6).
        num_train: training images (one epoch).
        num_val: held-out images for `val/loss` (rendered from `seed + 1`).
        batch_size: the global batch (one optimizer step over all ranks); `run_training` sets each rank's share.
        num_workers: DataLoader workers.
        seed: generation seed.
        shuffle_seed: seed of the training order (the run's `seed`).
        pin_memory: pin host memory when training on a GPU.
        channels: image channels (RGB: 3).
        latent_size, latent_channels: shape facts the backbone reads from the data config (through the
            autoencoder); kept here so the module can report them.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 4,
        num_train: int = 20_000,
        num_val: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int = 0,
        pin_memory: bool = True,
        channels: int = 3,
        latent_size: int | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        if channels != 3:
            raise ValueError(f"data.channels={channels} is not supported by data=shapes; it renders RGB (3)")
        for key, value in (("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{key}={value} must be a positive integer")
        if batch_size > num_train:
            raise ValueError(
                f"data.batch_size={batch_size} is larger than data.num_train={num_train}; use at most that"
            )
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if not 1 <= num_classes <= len(SHAPE_NAMES):  # checked here, before any work (rendering is in setup)
            raise ValueError(
                f"data.num_classes={num_classes} is not supported by data=shapes; use 1..{len(SHAPE_NAMES)}"
            )
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size} is too small for data=shapes; use 8 or more")
        self.image_size, self.num_classes = image_size, num_classes
        self.num_train, self.num_val = num_train, num_val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory, self.shuffle_seed = pin_memory, int(shuffle_seed)
        self.latent_size, self.latent_channels = latent_size, latent_channels
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of each class id (the sample grid labels its rows with them)."""
        return SHAPE_NAMES[: self.num_classes]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _TensorImages(*render_shapes(self.num_train, self.image_size, self.num_classes, self.seed))
            self.val_set = _TensorImages(*render_shapes(self.num_val, self.image_size, self.num_classes, self.seed + 1))

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """The resumable training order (`latentdiff.data.order`), from `data.seed`, split over ranks."""
        return train_loader(self, self.train_set, self.batch_size, self.shuffle_seed, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, **self._loader_options())
