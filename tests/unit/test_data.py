"""The built-in shapes dataset: deterministic, balanced, class-dependent, in the model's value range."""

from __future__ import annotations

import hashlib

import pytest
import torch

from latentdiff.data import SHAPE_NAMES, ShapesDataModule, render_shapes


def test_same_seed_same_images_other_seed_other_images():
    a, la = render_shapes(64, seed=3)
    b, lb = render_shapes(64, seed=3)
    c, _ = render_shapes(64, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_golden_render():
    images, labels = render_shapes(16, image_size=32, num_classes=4, seed=0)
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert digest == GOLDEN_DIGEST, digest  # rendering changed: every run's data changed with it


GOLDEN_DIGEST = "258d6edb8ab45054"


def test_classes_balanced_and_visually_distinct():
    images, labels = render_shapes(600, num_classes=6, seed=0)
    assert torch.bincount(labels).tolist() == [100] * 6
    # the fraction of the image a shape covers differs by class (a ring covers less than a circle, ...)
    cover = ((images.float().amax(1) - images.float().amin((1, 2, 3))[:, None, None]) > 64).float().mean((1, 2))
    per_class = torch.stack([cover[labels == k].mean() for k in range(6)])
    assert per_class.max() / per_class.min() > 1.3
    # colours vary within a class
    assert images[labels == 0].float().mean((2, 3)).std(0).min() > 20


def test_datamodule_batches_are_in_range():
    dm = ShapesDataModule(num_train=64, num_val=16, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["cond"].shape == (8,)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    val = next(iter(dm.val_dataloader()))
    assert not torch.equal(val["image"], batch["image"])  # held-out images come from another seed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_classes=7), "data.num_classes=7 is not supported by data=shapes; use 1..6"),
        (dict(image_size=4), "data.image_size=4 is too small"),
    ],
)
def test_bad_shapes_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        render_shapes(4, **kwargs)


def test_names():
    assert SHAPE_NAMES[:4] == ("circle", "square", "triangle", "cross")
