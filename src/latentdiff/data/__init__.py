"""Datamodules: the built-in `shapes` dataset (pixels) and, later, latent stores."""

from latentdiff.data.shapes import SHAPE_NAMES, ShapesDataModule, render_shapes

__all__ = ["SHAPE_NAMES", "ShapesDataModule", "render_shapes"]
