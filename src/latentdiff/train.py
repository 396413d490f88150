"""`run_training(cfg)`: build everything from a composed config and fit it with Lightning."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from latentdiff.checkpoint import check_resumable, checkpoints, load_checkpoint, read_torch_file, save_checkpoint
from latentdiff.distributed import rank_zero_process
from latentdiff.errors import ConfigError, NothingToDo, user_errors
from latentdiff.loggers import RunCSVLogger
from latentdiff.models.build import build_backbone, check_condition
from latentdiff.module import DiffusionModule
from latentdiff.objectives.masked_tokens import check_token_run
from latentdiff.rundir import latest_checkpoint, no_resume, stopped_before_first_checkpoint
from latentdiff.runlock import claim
from latentdiff.samplers.fit import make_sampling_scheduler
from latentdiff.strategies import check_strategy, install_hydra_launch, trainer_batch
from latentdiff.validation import validate_train_config

log = logging.getLogger(__name__)

# files whose presence means a run directory already holds a run
_RUN_MARKERS = ("last.ckpt", "metrics.csv", "config.yaml")
# what Lightning's DDP launcher writes into the launching process's environment
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin of every run: atomic writes (`save_checkpoint`) and `weights_only` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        # any file Lightning reads through the plugin (ddp_spawn also passes plain weights this way);
        # `run_training` verified the file it resumes from when it read its config
        return read_torch_file(path, map_location=map_location or "cpu", verify=False)


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The LightningModule of a run (backbone, frozen autoencoder, diffusion, EMA, optimizer partials)."""
    backbone = build_backbone(cfg.model)
    autoencoder = instantiate(cfg.vae)
    diffusion = instantiate(cfg.diffusion)
    module = DiffusionModule(
        backbone=backbone,
        autoencoder=autoencoder,
        diffusion=diffusion,
        optimizer=instantiate(cfg.optim.optimizer),
        lr_scheduler=instantiate(cfg.optim.lr_scheduler) if cfg.optim.get("lr_scheduler") else None,
        ema=instantiate(cfg.module.ema) if cfg.module.get("ema") else None,
        num_classes=cfg.module.num_classes,
        p_uncond=cfg.module.p_uncond,
        compile=OmegaConf.to_container(cfg.module.compile)
        if isinstance(cfg.module.compile, DictConfig)
        else cfg.module.compile,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
        nonfinite=OmegaConf.to_container(cfg.module.nonfinite) if cfg.module.get("nonfinite") else None,
    )
    check_token_run(backbone, autoencoder, diffusion)
    module.latent_shape = (cfg.data.latent_channels, cfg.data.latent_size, cfg.data.latent_size)
    return module


def _check_run_dir(run_dir: Path) -> None:
    existing = [name for name in _RUN_MARKERS if (run_dir / name).exists()]
    if existing:
        raise ConfigError(
            f"paths.output_dir={run_dir} already holds a run ({', '.join(existing)}); "
            f"choose a new directory, or continue that run with resume={run_dir}"
        )


def resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, str]:
    """The checkpoint to continue from and the config key that chose it (None: a fresh start).

    - `ckpt_path=<file>`: that file (into a new run directory, or into the `resume` one).
    - `resume=auto|<run dir>`: the run directory's latest checkpoint; a run stopped before its first checkpoint
      restarts from step 0 in its own directory (key "restart"); `auto` starts fresh when there is no run.
    - neither: a fresh run, which must not write into a directory that holds a run.
    """
    resume = None if no_resume(cfg.get("resume")) else cfg.get("resume")
    if not rank_zero_process():
        resume = resume if resume is not None else "spawned"  # rank 0 checked the directory already
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist")
        if resume is None:
            _check_run_dir(run_dir)
        return Path(cfg.ckpt_path), "ckpt_path"
    if resume is None:
        _check_run_dir(run_dir)
        return None, ""
    found = latest_checkpoint(run_dir, verify=resume != "spawned")  # rank 0 verified it for the others
    if found is not None:
        return found, "resume"
    if resume == "spawned":
        return None, ""
    files = checkpoints(run_dir)
    if files:
        raise ConfigError(
            f"resume={resume}: none of the checkpoints of {run_dir} is readable and intact "
            f"({', '.join(f.name for f in files)}); "
            "continue from a copy with ckpt_path=<file>, or start a new run"
        )
    if stopped_before_first_checkpoint(run_dir):
        log.warning("resume=%s: %s was stopped before its first checkpoint; restarting it from step 0", resume, run_dir)
        return None, "restart"
    if str(resume) != "auto":
        raise ConfigError(
            f"resume={resume} holds no readable checkpoint (last.ckpt, step_*.ckpt); "
            "use resume=auto, ckpt_path=<file>, or start a new run"
        )
    _check_run_dir(run_dir)
    return None, ""


def _check_loader_state(meta: dict, batch_size: int, world_size: int, key: str) -> None:
    """The data position is counted in per-rank batches: the batch size and world size must not change."""
    loops = meta.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    for state in loops.get("combined_loader", []):
        old_batch, old_world = int(state.get("batch_size", batch_size)), int(state.get("world_size", world_size))
        if old_world != world_size:
            raise ConfigError(
                f"the run has {world_size} processes but the checkpoint ({key}) was written by {old_world}; "
                "resume on the same number of devices and nodes (trainer.devices, trainer.num_nodes)"
            )
        if old_batch != batch_size:
            raise ConfigError(
                f"the per-rank batch {batch_size} differs from the checkpoint's {old_batch} ({key}); resume with "
                "the same data.batch_size and trainer.accumulate_grad_batches (the data position is counted in "
                "per-rank batches)"
            )


def _quiet_known_warnings() -> None:
    """Silence Lightning warnings that are expected here and would hide real ones."""
    for message in (
        r".*module\(s\) in eval mode.*",  # the EMA copy and the frozen autoencoder are eval by design
        r"Experiment logs directory .* exists and is not empty.*",  # config.yaml is written there first
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*does not have many workers.*",  # in-memory data needs none
        r".*is not supported by the model summary.*",  # bf16-mixed: the summary's size estimate only
    ):
        warnings.filterwarnings("ignore", message=message)


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train the run described by `cfg` (composed from `conf/train.yaml`).

    The run's first process claims its directory (`latentdiff.runlock.RunLock`) before it writes anything and
    releases it when the run ends, however it ends.

    Returns:
        The final logged metrics (floats), the run directory and the trainer's global step.

    Raises:
        ConfigError: a mistake in the config or its inputs, found before any work.
        NothingToDo: the run to continue is already at `trainer.max_steps`.
    """
    _quiet_known_warnings()
    install_hydra_launch()  # under Hydra, DDP ranks > 0 re-run this job (not the sweep) into the same directory
    with user_errors():
        validate_train_config(cfg)
        run_dir = Path(cfg.paths.output_dir)
        lock = claim(run_dir) if rank_zero_process() else None
    try:
        return _fit(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    with user_errors():
        ckpt_path, ckpt_key = resume_point(cfg, run_dir)
        resume_step, wandb_id = None, None
        if ckpt_path is not None:
            key = ckpt_key if ckpt_key == "ckpt_path" else "resume"  # `resume_point` verified the one it chose
            meta = load_checkpoint(ckpt_path, key, mmap=True, verify=ckpt_key == "ckpt_path")
            label = ckpt_path if ckpt_key == "ckpt_path" else f"{cfg.resume} ({ckpt_path.name})"
            check_resumable(
                meta["latentdiff"].get("config"), OmegaConf.to_container(cfg, resolve=True), ckpt_key, label
            )
            resume_step, wandb_id = int(meta.get("global_step", 0)), meta["latentdiff"].get("wandb_id")
            loader_meta = {"loops": meta.get("loops", {})}
            del meta
            max_steps = int(cfg.trainer.max_steps)
            if max_steps != -1 and resume_step >= max_steps:
                where = f"resume={cfg.resume}: {run_dir}" if ckpt_key == "resume" else f"ckpt_path={ckpt_path}"
                raise NothingToDo(
                    f"{where} is finished: its checkpoint is at step {resume_step} and trainer.max_steps={max_steps}; "
                    "nothing to train (raise trainer.max_steps to continue it, or start a new run with resume=null)"
                )
            # the same wandb run only when the same run directory goes on (ckpt_path starts a new run)
            if ckpt_key == "resume" and wandb_id and OmegaConf.select(cfg, "logger.wandb") is not None:
                cfg.logger.wandb.id = wandb_id
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.get("matmul_precision"):
            torch.set_float32_matmul_precision(cfg.matmul_precision)
        datamodule = instantiate(cfg.data)
        module = build_module(cfg)
        if cfg.get("sampler"):  # the grids and FID sample with it: fail now (diffusers' own option checks too)
            make_sampling_scheduler(instantiate(cfg.sampler.scheduler), module.diffusion.scheduler)
        if hasattr(datamodule, "check_autoencoder"):
            datamodule.check_autoencoder(module.autoencoder)
        check_condition(module.backbone, bool(getattr(datamodule, "text", False)), module.num_classes)
        if getattr(datamodule, "text", False):
            module.backbone.check_text_features(datamodule.store.meta.get("text"), f"data.root={datamodule.store.root}")
        empty_text = getattr(datamodule, "empty_text", None)
        if empty_text is not None:
            module.null_text = empty_text  # (L, D): the null condition of text runs
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        if cfg.trainer.get("enable_progress_bar") is False:  # batch jobs: no bar, whatever callbacks= holds
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
        for logger in loggers:
            if isinstance(logger, RunCSVLogger):
                logger.resume_step = resume_step  # keep the history before the checkpoint
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
        )
        check_strategy(trainer)
        # data.batch_size is the global batch: each rank loads its share (checked when the world size is known)
        datamodule.batch_size = batch_size = trainer_batch(trainer, int(cfg.data.batch_size))
        if ckpt_path is not None:
            _check_loader_state(loader_meta, batch_size, trainer.world_size, str(ckpt_path))

    run_dir.mkdir(parents=True, exist_ok=True)
    # a resumed run keeps its first config; a restarted one (stopped before its first checkpoint) gets this one
    if trainer.is_global_zero and (ckpt_key == "restart" or not (run_dir / "config.yaml").exists()):
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    num_params = sum(p.numel() for p in module.backbone.parameters())
    log.info(
        "backbone %s: %.2fM parameters; run directory %s",
        type(module.backbone).__name__,
        num_params / 1e6,
        run_dir,
    )
    if ckpt_path is not None:
        log.info("resuming from %s (step %d)", ckpt_path, resume_step)
    launch_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        # the next run of this process (a sweep job) launches its own ranks: Lightning's launcher left
        # LOCAL_RANK & co. in os.environ (they would read as "started by torchrun") and the process group open
        for key, value in launch_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()  # the next run of this process (a sweep) gets its own wandb run
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return {"metrics": metrics, "run_dir": str(run_dir), "global_step": trainer.global_step}


def train(cfg: DictConfig) -> dict[str, Any] | float:
    """`train.py`'s task: `run_training`, returning `cfg.objective`'s final value when a sweeper optimises it."""
    result = run_training(cfg)
    if not cfg.get("objective"):
        return result
    value = result["metrics"].get(cfg.objective)
    if value is None:
        logged = ", ".join(sorted(result["metrics"])) or "none"
        raise ConfigError(f"objective={cfg.objective} was not logged by this run; logged: {logged}")
    return float(value)
