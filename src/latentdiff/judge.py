"""The shapes judge: a small classifier of the built-in shapes that scores generated shapes images offline.

Two scores for a set of generated shapes images and the classes they were asked for:
- **shape accuracy** (`shape_acc`): the fraction the judge classifies as the class asked for;
- **FD-shapes** (`fd_shapes`): the Fréchet distance (torch-fidelity's formula, as FID) between the judge's penultimate
  features of the samples and of real rendered images of the same classes, with its floor (`fd_shapes_floor`):
  the distance between two independent real sets of that size. A perfect generator scores about the floor.

The judge is trained deterministically from `JUDGE_SEED` on images rendered from seeds no run uses (runs render
from their `data.seed` and `data.seed + 1`, small numbers), in about half a minute on 2 CPU cores, and cached as a
weights file keyed by its seed, the image size and the renderer's version (`data.shapes.RENDER_VERSION`) under
`~/.cache/latentdiff/judge` (`cache_file`). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdiff.data.shapes import RENDER_VERSION, SHAPE_NAMES, render_shapes
from latentdiff.files import save_torch

log = logging.getLogger(__name__)

JUDGE_SEED = 1_000_003  # the judge's training images; its held-out and real reference sets use the next seeds
TRAIN_IMAGES, TEST_IMAGES, STEPS, BATCH = 8_000, 3_000, 400, 64
FEATURES = 64  # the penultimate width: the features FD-shapes compares
MIN_ACCURACY = 0.995
JUDGE_VERSION = 1  # raise it when the network or its training changes: the cache file is keyed by it


class ShapesJudge(nn.Module):
    """Three 3x3 conv blocks and a linear read-out over all `SHAPE_NAMES`; `features` is the penultimate layer."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), *block(128, 128)
        )
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, len(SHAPE_NAMES))

    @staticmethod
    def prepare(images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images, (N, 3, H, W) or (N, H, W, 3) as in samples.npz -> float (N, 3, H, W) in [-1, 1]."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"the judge reads RGB images (N, 3, H, W) or (N, H, W, 3); got {tuple(x.shape)}")
        if x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return x.float().contiguous() / 127.5 - 1.0  # one memory layout: the same features for either input layout

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, FEATURES)."""
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def read(self, images: torch.Tensor | np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted class ids (N,), features (N, FEATURES) in float64) of uint8 images."""
        self.eval()
        x = self.prepare(images)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"the judge was trained on {self.image_size}x{self.image_size} shapes; got "
                f"{x.shape[-2]}x{x.shape[-1]} images"
            )
        preds, feats = [], []
        for chunk in x.split(batch):
            f = self.features(chunk)
            preds.append(self.head(f).argmax(1))
            feats.append(f.double())
        return torch.cat(preds), torch.cat(feats)


def cache_file(image_size: int, seed: int = JUDGE_SEED) -> Path:
    """Where the judge of `image_size` shapes, trained from `seed`, is kept: under `$LATENTDIFF_CACHE`, else
    `$XDG_CACHE_HOME/latentdiff`, else `~/.cache/latentdiff`."""
    root = os.environ.get("LATENTDIFF_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentdiff"
    name = f"shapes-v{JUDGE_VERSION}-render{RENDER_VERSION}-seed{seed}-{image_size}px.pt"
    return Path(root) / "judge" / name


def load_judge(image_size: int = 32, seed: int = JUDGE_SEED) -> ShapesJudge:
    """The judge of `image_size` shapes: read from its cache file, or trained (and cached) when there is none."""
    import fcntl

    path = cache_file(image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # processes that start together train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            judge = ShapesJudge(image_size)
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["weights"])
            return judge.eval()
        judge, accuracy = train_judge(image_size, seed)
        save_torch({"weights": judge.state_dict(), "accuracy": accuracy, "seed": seed}, path)
    log.info("shapes judge trained: %.2f%% held-out accuracy, cached at %s", 100 * accuracy, path)
    return judge


def train_judge(image_size: int = 32, seed: int = JUDGE_SEED) -> tuple[ShapesJudge, float]:
    """A judge trained from `seed` (its initial weights, images and batches: same seed, same judge on one
    machine) and its accuracy on held-out images rendered from `seed + 1`.

    Raises:
        RuntimeError: the held-out accuracy is under `MIN_ACCURACY` (the scores would not mean what they say).
    """
    classes = len(SHAPE_NAMES)
    images, labels = render_shapes(TRAIN_IMAGES, image_size, classes, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = ShapesJudge(image_size)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=STEPS, pct_start=0.15)
    judge.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(labels), (BATCH,), generator=generator)
        loss = nn.functional.cross_entropy(judge(judge.prepare(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    test_images, test_labels = render_shapes(TEST_IMAGES, image_size, classes, seed=seed + 1)
    accuracy = float((judge.read(test_images)[0] == test_labels).double().mean())
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"the shapes judge reached {accuracy:.4f} held-out accuracy, under {MIN_ACCURACY}")
    return judge.eval(), accuracy


def real_shapes(labels: torch.Tensor, image_size: int, seed: int) -> torch.Tensor:
    """Real rendered images (N, 3, H, W) uint8 of the classes `labels` (N,), in that order."""
    labels = torch.as_tensor(labels).long()
    kinds = int(labels.max()) + 1 if len(labels) else 1
    per_class = int(torch.bincount(labels, minlength=kinds).max()) if len(labels) else 0
    images, drawn = render_shapes(max(per_class * kinds, 1), image_size, kinds, seed=seed)
    out = torch.empty((len(labels), 3, image_size, image_size), dtype=torch.uint8)
    for k in range(kinds):
        mine = (labels == k).nonzero().flatten()
        out[mine] = images[(drawn == k).nonzero().flatten()[: len(mine)]]
    return out


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between two feature sets (N, D): torch-fidelity's FID formula."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f) for f in (a, b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def judge_samples(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    judge: ShapesJudge | None = None,
    seed: int = JUDGE_SEED,
) -> dict[str, float]:
    """The judge's scores of uint8 `images` asked to be of classes `labels` (see the module docstring).

    Returns:
        {"shape_acc", "fd_shapes", "fd_shapes_floor"}; the real sets are rendered from `seed + 2` and `seed + 3`.
    """
    labels = torch.as_tensor(np.asarray(labels)).long().flatten()
    x = ShapesJudge.prepare(images)
    if len(labels) != len(x) or len(x) < 2:
        raise ValueError(f"the judge needs at least 2 images and one class id each; got {len(x)} and {len(labels)}")
    if int(labels.min()) < 0 or int(labels.max()) >= len(SHAPE_NAMES):
        raise ValueError(f"class ids must be in [0, {len(SHAPE_NAMES)}) (the shapes); got {int(labels.max())}")
    judge = judge or load_judge(x.shape[-1], seed)
    preds, feats = judge.read(images)
    real = [judge.read(real_shapes(labels, judge.image_size, seed + k))[1] for k in (2, 3)]
    return {
        "shape_acc": float((preds == labels).double().mean()),
        "fd_shapes": frechet_distance(feats, real[0]),
        "fd_shapes_floor": frechet_distance(real[1], real[0]),
    }
