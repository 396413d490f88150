"""Latent data: extraction (image folder and COCO captions) into a sharded store, resume, the datamodule,
training on stores with U-ViT and the UNets, and the errors of mismatched or damaged stores."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentdiff.data import center_crop_arr


def test_adm_center_crop_halves_then_crops_the_centre():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))  # W=96, H=64
    out = center_crop_arr(image, 32)
    # 64 >= 2*32: one BOX halving to 48x32, the short side is then 32 (no resize), centre columns 8..40
    expected = np.asarray(image.resize((48, 32), resample=Image.BOX))[:, 8:40]
    assert out.shape == (32, 32, 3) and np.array_equal(out, expected)
