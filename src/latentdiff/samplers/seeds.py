"""Per-index seeds: sample `i` of a run with seed `s` draws its start noise, its class (when drawn at random) and
the noise of stochastic solver steps from generators seeded by `SeedSequence([s, i, stream])`. An image depends
only on (model, sampler, s, i): not on the batch size, the number of processes or which process made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NOISE, LABEL, STEP = 0, 1, 2  # generator streams of one sample index


def index_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for (run seed, sample index, stream), well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def initial_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """(B, *shape) float32 standard normal start noise on the CPU, one generator per sample index."""
    return torch.stack([torch.randn(tuple(shape), generator=index_generator(seed, i, NOISE)) for i in indices])


def step_generators(indices: Sequence[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample index for the draws of the sampling steps, on `device` (where diffusers draws)."""
    generators = [index_generator(seed, i, STEP) for i in indices]
    if device.type != "cpu":
        generators = [torch.Generator(device).manual_seed(g.initial_seed()) for g in generators]
    return generators
