"""Data: the built-in `shapes` dataset (pixels), extraction sources and latent stores."""

from latentdiff.data.latents import LatentDataModule, LatentDataset
from latentdiff.data.shapes import SHAPE_NAMES, ShapesDataModule, render_shapes
from latentdiff.data.sources import CocoCaptionsSource, ImageFolderSource, center_crop_arr
from latentdiff.data.store import LatentStore, StoreError

__all__ = [
    "SHAPE_NAMES",
    "CocoCaptionsSource",
    "ImageFolderSource",
    "LatentDataModule",
    "LatentDataset",
    "LatentStore",
    "ShapesDataModule",
    "StoreError",
    "center_crop_arr",
    "render_shapes",
]
