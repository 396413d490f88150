"""Two image sets (npz in the ADM layout and PNG folders) and a random-weight Inception in torch-fidelity's
format, shared by the metric tests of every tier (each module's `sets` fixture makes them once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentdiff.data import render_shapes

from ..artefacts import make_inception_weights

N = 48  # images per set: enough for a full-rank-free FID, KID subsets of 40, 4 IS splits


def make_sets(root: Path) -> dict:
    """Two image sets as npz (ADM layout) and as PNG folders under `root`, plus the Inception weights file.

    Returns:
        {"weights": the weights file, "root": root, "a" and "b": the (N, 32, 32, 3) uint8 images}.
    """
    weights = make_inception_weights(root / "inception.pth")
    out = {"weights": weights, "root": root}
    for name, seed in (("a", 1), ("b", 2)):
        images, labels = render_shapes(N, seed=seed)
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) uint8
        np.savez(root / f"{name}.npz", arr_0=nhwc, arr_1=labels.numpy())
        folder = root / name
        folder.mkdir()
        for i, image in enumerate(images):
            torch_fidelity_png(folder / f"{i:04d}.png", image)
        out[name] = nhwc
    return out


def torch_fidelity_png(path: Path, image: torch.Tensor) -> None:
    import torchvision

    torchvision.io.write_png(image, str(path))
