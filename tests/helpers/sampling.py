"""The tiny run's module, built from its config without training, for the sampler tests of every tier."""

from __future__ import annotations

import torch

from latentdiff.train import build_module

from ..conftest import TINY_RUN


def sampling_module(compose_cfg, *overrides: str):
    torch.manual_seed(0)
    module = build_module(compose_cfg([*TINY_RUN, *overrides])).eval()
    module.latent_shape = (3, 32, 32)
    return module
