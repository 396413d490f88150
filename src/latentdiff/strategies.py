"""Lightning strategies for data parallelism: Hydra-safe DDP launching, FSDP for large backbones, and the checks
and batch split of a built trainer.

- Lightning's DDP launcher re-runs the command for ranks > 0. Its Hydra variant replays `sys.argv`, which under
  `-m` starts a whole sweep in every child and sends the children to Hydra's `run.dir` instead of the job's
  directory. `install_hydra_launch` replaces it: a child re-runs exactly the current job (its own overrides,
  no `-m`) into the same output directory, writing no Hydra record of its own.
- `FSDP` is Lightning's `FSDPStrategy` that keeps the frozen autoencoder out of the shards (it is decoded
  outside the wrapped forward) and wraps the backbone and its EMA copy alike, so their shards line up and the
  EMA update stays element-wise (see `wrap_policy`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from latentdiff.distributed import per_rank_batch
from latentdiff.errors import ConfigError
from latentdiff.lightning_internals import replace_hydra_subprocess_command


def trainer_batch(trainer: L.Trainer, global_batch: int) -> int:
    """`per_rank_batch` for a built trainer (its world size, including torchrun and SLURM launches)."""
    return per_rank_batch(int(global_batch), trainer.world_size, int(trainer.accumulate_grad_batches))


def check_strategy(trainer: L.Trainer) -> None:
    """Refuse combinations that would fail only after the ranks start (FSDP needs GPUs; DDP works everywhere)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    if isinstance(trainer.strategy, FSDPStrategy) and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "trainer=fsdp with trainer.accelerator=cpu: torch's FSDP needs GPUs; use trainer=ddp on CPU "
            "(or trainer.accelerator=gpu)"
        )


def shards_parameters(trainer: L.Trainer) -> bool:
    """True when every rank must take part in a forward pass (FSDP), so rank-0-only sampling would hang."""
    return isinstance(trainer.strategy, FSDPStrategy)


# ------------------------------------------------------------------------------------ Hydra + DDP launching
def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for local rank `local_rank` > 0 of the current Hydra job, and its cwd.

    The job's own overrides (a sweep job's values, not the sweep), single-run mode, the job's output directory
    as `hydra.run.dir` and no `.hydra` record (rank 0 writes it).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={_quote(str(hydra_cfg.runtime.output_dir))}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


def install_hydra_launch() -> None:
    """Make Lightning's DDP launchers (fabric's and the trainer's) start ranks > 0 with `hydra_child_command`."""
    replace_hydra_subprocess_command(hydra_child_command)


# ---------------------------------------------------------------------------------------------------- FSDP
def _resolve(name: str) -> type:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"trainer.strategy.auto_wrap_policy: cannot import {name!r} ({err})") from err


def wrap_policy(classes: Iterable[str]) -> Any:
    """FSDP auto-wrap policy: each module of these classes (dotted names) becomes its own FSDP unit.

    List the backbone classes as well as their blocks: the trained backbone and its EMA copy then get the
    same units, hence the same flat-parameter layout and the same local shards on every rank.
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({_resolve(name) for name in classes})


class FSDP(FSDPStrategy):
    """Lightning's FSDP with the frozen autoencoder left whole on every rank (never sharded, never saved)."""

    strategy_name = "latentdiff_fsdp"

    def setup(self, trainer: L.Trainer) -> None:
        # set before the parent's setup wraps the module (FSDP's `ignored_modules` are given at wrapping)
        frozen = [m for m in (getattr(self.lightning_module, "autoencoder", None),) if m is not None]
        if frozen:
            self.kwargs["ignored_modules"] = frozen
            for module in frozen:
                module.to(self.root_device)
        super().setup(trainer)
