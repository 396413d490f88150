"""Ranks, world size and devices: one implementation for training, extraction and sampling.

- `rank_zero_process`: False in the processes a launcher started for ranks > 0.
- `dist_env`: (rank, world size, local rank) from torchrun or SLURM; `device_for`: a process's device.
- `per_rank_batch`: `data.batch_size` is the global batch of one optimizer step (the papers' number); each rank
  loads `batch_size / (world size x accumulate_grad_batches)` per micro-batch.

The strategies built on Lightning (DDP launching under Hydra, FSDP) are `strategies.py`. This module imports
nothing of the package but the errors, and neither Lightning nor (until a device is asked for) torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from latentdiff.errors import ConfigError

if TYPE_CHECKING:
    import torch


def rank_zero_process() -> bool:
    """False in the processes a launcher started for ranks > 0 (Lightning's DDP, torchrun, SLURM tasks)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"))


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or SLURM variables; (0, 1, 0) otherwise.

    SLURM counts only inside an `srun` step (SLURM_STEP_NUM_TASKS): a batch script's own shell is one process
    even when the job has several tasks.
    """
    slurm = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), slurm):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, 0))
    return 0, 1, 0


def device_for(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of one process: `auto` is its GPU (`cuda:<local rank>`) when there is one, else the CPU.

    Raises:
        ConfigError: `device=cuda...` with no visible CUDA device.
    """
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def per_rank_batch(global_batch: int, world_size: int, accumulate: int = 1) -> int:
    """The micro-batch each rank loads so that one optimizer step sees `global_batch` items.

    Raises:
        ConfigError: `global_batch` is not a multiple of `world_size * accumulate`.
    """
    split = int(world_size) * int(accumulate)
    if global_batch % split:
        lower, upper = (global_batch // split) * split, (global_batch // split + 1) * split
        raise ConfigError(
            f"data.batch_size={global_batch} (the global batch) does not split over {world_size} process(es) x "
            f"{accumulate} accumulation step(s) (trainer.devices x trainer.num_nodes, "
            f"trainer.accumulate_grad_batches); use a multiple of {split}, e.g. {lower or split} or {upper}"
        )
    return global_batch // split
