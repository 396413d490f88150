"""Training callbacks: EMA sample grids, FID during training and the loss-curve plot, written into the run
directory."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from latentdiff.distributed import shards_parameters

log = logging.getLogger(__name__)


class _SamplingCallback(L.Callback):
    """A callback that samples the module's EMA backbone with a configured sampler (`conf/sampler`)."""

    scheduler_partial: Callable
    steps: int
    guidance_scale: float
    guidance_interval: list[float] | None
    step_kwargs: dict[str, Any]
    seed: int

    def sampler(self, pl_module):
        """The `ImageSampler` of the module's sampling (EMA) backbone with this callback's settings."""
        from latentdiff.samplers.image import module_sampler

        return module_sampler(
            pl_module,
            self.scheduler_partial,
            self.steps,
            self.guidance_scale,
            guidance_interval=self.guidance_interval,
            step_kwargs=self.step_kwargs,
            seed=self.seed,
        )


class SampleGrid(_SamplingCallback):
    """Every `every_n_steps` optimizer steps (and at the end), sample a grid with the EMA backbone.

    Rows are classes (class-conditional data) and columns are samples; unconditional runs give a square
    grid. The start noise is the same at every step, so successive grids show the same "seeds" learning.
    Files: `<dirpath>/step_0001000.png`; the image is also sent to TensorBoard / wandb when they log.

    Args:
        dirpath: folder of the PNG files.
        scheduler: partial building the sampling scheduler from the training schedule's config
            (e.g. `DPMSolverMultistepScheduler.from_config`), from `conf/sampler/`.
        steps: solver steps.
        guidance_scale: CFG weight w (diffusers/DiT convention; 1 = none).
        guidance_interval: (low, high) training timesteps where guidance applies; None: all steps.
        step_kwargs: extra `scheduler.step` arguments (e.g. `eta` for DDIM).
        every_n_steps: sampling period in optimizer steps (0 = only at the end).
        samples_per_class: columns of a class-conditional grid.
        num_samples: size of an unconditional grid.
        max_classes: at most this many class rows (ImageNet has 1000 classes); classes are evenly spaced.
        seed: the sampling seed (the start noise of grid image i is that of `sample.py`'s sample i).
    """

    def __init__(
        self,
        dirpath: str,
        scheduler: Callable,
        steps: int = 25,
        guidance_scale: float = 1.0,
        step_kwargs: dict[str, Any] | None = None,
        every_n_steps: int = 1000,
        guidance_interval: list[float] | None = None,
        samples_per_class: int = 8,
        num_samples: int = 64,
        max_classes: int = 10,
        seed: int = 0,
    ):
        if every_n_steps < 0:
            raise ValueError(f"callbacks.sample_grid.every_n_steps={every_n_steps} must be >= 0")
        self.dirpath = Path(dirpath)
        self.scheduler_partial = scheduler
        self.steps, self.guidance_scale, self.guidance_interval = steps, guidance_scale, guidance_interval
        self.step_kwargs = dict(step_kwargs or {})
        self.every_n_steps = every_n_steps
        self.samples_per_class, self.num_samples, self.max_classes = (
            samples_per_class,
            num_samples,
            max_classes,
        )
        self.seed = seed
        self._last_step = -1
        self.prompts: tuple[torch.Tensor, list[str]] | None = None  # text runs: (N, L, D) features, captions

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Text runs sample the datamodule's held-out captions (`prompts(n)`), the same ones at every step."""
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(pl_module, "null_text", None) is not None and hasattr(datamodule, "prompts"):
            self.prompts = datamodule.prompts(self.num_samples)

    def _conditions(self, pl_module) -> tuple[torch.Tensor | None, int]:
        """(B,) class ids laid out row by row, or (B, L, D) text features; and the number of columns."""
        if getattr(pl_module, "null_text", None) is not None:
            if self.prompts is None:
                raise ValueError("a text-conditional sample grid needs prompts (a text datamodule's prompts(n))")
            features = self.prompts[0]
            return features, max(1, round(math.sqrt(len(features))))
        if pl_module.num_classes > 0:
            rows = min(pl_module.num_classes, self.max_classes)
            classes = torch.linspace(0, pl_module.num_classes - 1, rows).round().long()  # (rows,)
            return classes.repeat_interleave(self.samples_per_class), self.samples_per_class
        return None, max(1, round(math.sqrt(self.num_samples)))

    @torch.no_grad()
    def make_grid(self, pl_module) -> torch.Tensor:
        """Sample and decode the grid; returns a (3, H, W) float image in [0, 1]."""
        cond, ncol = self._conditions(pl_module)
        count = len(cond) if cond is not None else self.num_samples
        images = (
            self.sampler(pl_module).images(list(range(count)), cond).permute(0, 3, 1, 2).float() / 255
        )  # (B, 3, H, W)
        return torchvision.utils.make_grid(images, nrow=ncol, padding=2, pad_value=1.0)

    def _save(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        every_rank = shards_parameters(trainer)  # FSDP: each forward needs all ranks; they draw the same grid
        if step == self._last_step or not (trainer.is_global_zero or every_rank):
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            grid = self.make_grid(pl_module)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, self.dirpath / f"step_{step:07d}.png")
        if self.prompts is not None:  # the captions of the grid, row by row
            (self.dirpath / "prompts.txt").write_text("\n".join(self.prompts[1]) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


class LossCurve(L.Callback):
    """Plots `train/loss` (raw and smoothed) and `val/loss` against steps into `<path>` (PNG).

    Args:
        path: output PNG file.
        every_n_steps: record the training loss every this many steps.
        smoothing: EMA factor of the smoothed training curve.
    """

    def __init__(self, path: str, every_n_steps: int = 10, smoothing: float = 0.95):
        self.path = Path(path)
        self.every_n_steps = max(1, every_n_steps)
        self.smoothing = smoothing
        self.train: list[tuple[int, float]] = []
        self._unread: list[tuple[int, torch.Tensor]] = []  # losses still on the device (read back when plotting)
        self.val: dict[str, list[tuple[int, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        first = not self.train and not self._unread
        if outputs is not None and (trainer.global_step % self.every_n_steps == 0 or first):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self._unread.append((trainer.global_step, loss.detach()))  # no host-device sync in the step

    def _read(self) -> None:
        if self._unread:
            values = torch.stack([loss.float().reshape(()) for _, loss in self._unread]).tolist()
            self.train += [(step, v) for (step, _), v in zip(self._unread, values, strict=True)]
            self._unread = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for key in ("val/loss", "val/loss_ema"):
            if key in trainer.callback_metrics:
                self.val.setdefault(key, []).append((trainer.global_step, float(trainer.callback_metrics[key])))
        self.plot(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.plot(trainer)

    def plot(self, trainer) -> None:
        self._read()
        if not trainer.is_global_zero or not self.train:
            return
        from matplotlib.figure import Figure  # no pyplot: no GUI backend is chosen

        fig = Figure(figsize=(7, 4), dpi=120)
        ax = fig.add_subplot()
        steps, losses = zip(*self.train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train/loss")
        smooth, acc = [], losses[0]
        for value in losses:
            acc = self.smoothing * acc + (1 - self.smoothing) * value
            smooth.append(acc)
        ax.plot(steps, smooth, color="tab:blue", lw=1.8, label=f"train/loss (EMA {self.smoothing})")
        for (key, points), colour in zip(self.val.items(), ("tab:orange", "tab:green")):
            ax.plot(*zip(*points), "o-", color=colour, ms=3, label=key)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar showing `train/loss`, read back from the device only when the bar refreshes.

    (A metric logged with `prog_bar=True` is converted to a Python number after every batch: one host-device
    sync per step. `train/loss` is logged without it and read here every `refresh_rate` batches.)
    """

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["train/loss"] = f"{float(loss):.3f}"
        return items


class Throughput(L.Callback):
    """Training speed without a host-device sync in the step: samples/s, TFLOP/s and MFU at each log step.

    Lightning's `ThroughputMonitor` synchronizes the GPU after every batch; this callback does so once per
    log interval (when the loggers write anyway) and divides the samples of the interval by its wall time,
    validation excluded. Logged (per device, and summed over ranks):
    `train/device/samples_per_sec`, `train/samples_per_sec`, and with a FLOP count `train/device/tflops_per_sec`
    and `train/device/mfu`. FLOPs per sample are 3x the backbone's forward FLOPs (forward + backward),
    counted once by `latentdiff.flops` on the meta device from the run config.

    Args:
        peak_tflops: the device's peak TFLOP/s for MFU; None: Lightning's table of GPU peaks for the run's
            precision (no MFU on a CPU or an unknown GPU; `python bench/train.py` measures a matmul peak).
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.flops_per_sample: float | None = None
        self._samples, self._t0, self._paused = 0, None, 0.0
        self._val_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.flops_per_sample = _train_flops_per_sample(pl_module)
        if self.peak_tflops is None and trainer.strategy.root_device.type == "cuda":
            from lightning.fabric.utilities.throughput import get_available_flops
            from lightning.pytorch.utilities.compile import _plugin_to_compute_dtype

            peak = get_available_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
            self.peak_tflops = peak / 1e12 if peak else None
        self._samples, self._t0, self._paused = 0, None, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._val_start is not None:
            self._paused += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        from latentdiff.data.order import batch_items

        self._samples += batch_items(batch)
        if not trainer._logger_connector.should_update_logs:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once per log interval: the step's kernels have run
        now = time.perf_counter()
        if self._t0 is not None:  # the first interval holds compilation and warm-up: not reported
            rate = self._samples / max(now - self._t0 - self._paused, 1e-9)
            metrics = {"train/device/samples_per_sec": rate, "train/samples_per_sec": rate * trainer.world_size}
            if self.flops_per_sample:
                metrics["train/device/tflops_per_sec"] = rate * self.flops_per_sample / 1e12
                if self.peak_tflops:
                    metrics["train/device/mfu"] = metrics["train/device/tflops_per_sec"] / self.peak_tflops
            pl_module.log_dict(metrics, batch_size=1)
        self._samples, self._t0, self._paused = 0, now, 0.0


def _train_flops_per_sample(pl_module) -> float | None:
    """3x the backbone's forward FLOPs per sample, counted from the run config (None when it cannot be)."""
    from omegaconf import OmegaConf

    from latentdiff.flops import config_cost

    if not getattr(pl_module, "run_config", None):
        return None
    try:
        return 3 * 2 * config_cost(OmegaConf.create(pl_module.run_config)).macs
    except Exception as err:  # a backbone the counter cannot trace: speed without FLOPs
        log.warning("no FLOP count for the throughput log (%s)", str(err).splitlines()[0] if str(err) else err)
        return None


def metric_name(num_samples: int) -> str:
    """`val/fid_10k` for 10000 samples, `val/fid_500` for 500."""
    n = int(num_samples)
    return f"val/fid_{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"val/fid_{n}"


class FID(_SamplingCallback):
    """Every `every_n_steps` optimizer steps, FID of `num_samples` EMA samples against `reference`.

    The samples are made as `sample.py` makes them (per-index seeds, uniform random classes or the held-out
    captions), split over all ranks; Inception features are gathered on rank 0, which computes the FID.
    Logs `val/fid_10k` (for 10000 samples) and keeps the best checkpoint as `<dirpath>/best_fid.ckpt`.

    Args:
        reference: statistics npz (mu, sigma), images npz or image folder (see `latentdiff.metrics`).
        num_samples: N of FID-N.
        every_n_steps: period in optimizer steps.
        scheduler, steps, guidance_scale, guidance_interval, step_kwargs: the sampler (`conf/sampler`).
        batch_size: images per sampling batch on each rank.
        inception_weights: torch-fidelity Inception weights file; None: its release file (downloaded once).
        cache_dir: where reference features are cached.
        dirpath: folder of best_fid.ckpt; None: no best checkpoint.
        seed: the sampling seed.
    """

    def __init__(
        self,
        reference: str,
        scheduler: Callable,
        num_samples: int = 10000,
        every_n_steps: int = 10000,
        steps: int = 25,
        guidance_scale: float = 1.0,
        guidance_interval: list[float] | None = None,
        step_kwargs: dict[str, Any] | None = None,
        batch_size: int = 64,
        inception_weights: str | None = None,
        cache_dir: str | None = None,
        dirpath: str | None = None,
        seed: int = 0,
    ):
        if not reference:
            raise ValueError("callbacks.fid.reference is not set; give a statistics npz, an images npz or a folder")
        if int(num_samples) < 2 or int(every_n_steps) < 1 or int(batch_size) < 1:
            raise ValueError(
                f"callbacks.fid: num_samples={num_samples} (>= 2), every_n_steps={every_n_steps} and "
                f"batch_size={batch_size} (>= 1) are not valid"
            )
        self.reference_path, self.scheduler_partial = reference, scheduler
        self.num_samples, self.every_n_steps, self.steps = int(num_samples), int(every_n_steps), int(steps)
        self.guidance_scale, self.guidance_interval = float(guidance_scale), guidance_interval
        self.step_kwargs, self.batch_size = dict(step_kwargs or {}), int(batch_size)
        self.inception_weights, self.cache_dir = inception_weights, cache_dir
        self.dirpath, self.seed = Path(dirpath) if dirpath else None, int(seed)
        self.name = metric_name(self.num_samples)
        self.best = float("inf")
        self._inception = self._reference = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Fail before training when the reference cannot be read (its features are made at the first FID,
        on the module's device: the strategy has not moved the module yet here)."""
        from latentdiff.metrics import open_images

        open_images(self.reference_path, "callbacks.fid.reference")

    def _prepare(self, trainer: L.Trainer, pl_module) -> None:
        from latentdiff.inception import Inception
        from latentdiff.metrics import load_reference

        if self._inception is None:
            self._inception = Inception(self.inception_weights, pl_module.device, self.batch_size)
        if self._reference is None and trainer.is_global_zero:
            self._reference = load_reference(self.reference_path, self._inception, self.cache_dir, need_features=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            fid = self.compute(trainer, pl_module)
            trainer.callback_metrics[self.name] = torch.tensor(fid)  # for monitors and the run's summary
            if trainer.is_global_zero:  # once, at this step (self.log would repeat it until the epoch ends)
                for logger in trainer.loggers:
                    logger.log_metrics({self.name: fid}, step=step)
            if fid < self.best:
                self.best = fid
                if self.dirpath is not None:
                    trainer.save_checkpoint(self.dirpath / "best_fid.ckpt")

    @torch.no_grad()
    def compute(self, trainer: L.Trainer, pl_module) -> float:
        """FID-N of the module's sampling (EMA) backbone; the same value is returned on every rank."""
        from latentdiff.inception import FID_LAYER
        from latentdiff.metrics import compute_metrics
        from latentdiff.samplers.conditions import PromptSet, conditions_for

        self._prepare(trainer, pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = math.ceil(self.num_samples / world)
        mine = list(range(rank, self.num_samples, world))
        valid = len(mine)
        mine += [mine[-1] if mine else 0] * (per_rank - valid)  # equal sizes for all_gather; copies are dropped
        prompts = None
        if getattr(pl_module, "null_text", None) is not None:
            prompts = PromptSet(trainer.datamodule.val_store)
        was_training = pl_module.training
        pl_module.eval()
        try:
            sampler = self.sampler(pl_module)
            feats = []
            for start in range(0, per_rank, self.batch_size):
                indices = mine[start : start + self.batch_size]
                cond, _ = conditions_for(indices, pl_module.num_classes, self.seed, "uniform", prompts)
                feats.append(self._inception.features([sampler.images(indices, cond)])[FID_LAYER])
        finally:
            pl_module.train(was_training)
        local = torch.cat(feats).to(pl_module.device)  # (per_rank, 2048)
        valid_t = torch.tensor([valid], device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(-1, per_rank, local.shape[-1])  # (world, k, 2048)
        counts = trainer.strategy.all_gather(valid_t).reshape(-1)  # (world,)
        fid = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        if trainer.is_global_zero:
            features = torch.cat([gathered[r, : int(counts[r])] for r in range(gathered.shape[0])]).cpu()
            fid += compute_metrics({FID_LAYER: features}, self._reference, ["fid"], {})["fid"]
        return float(trainer.strategy.broadcast(fid, src=0))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict.get("best", float("inf")))


class Preemption(L.Callback):
    """SIGTERM and SIGUSR1 stop the run with a checkpoint at the next optimizer-step boundary; exit 0.

    The signal handlers only set a flag. At the end of each optimizer step (never inside a gradient-
    accumulation cycle) the ranks agree on it (any rank signalled: all stop), `last.ckpt` is written in the
    same loop state as the periodic checkpoints (through `callbacks.checkpoint` when it is there), and the
    trainer stops cleanly. `python train.py ... resume=auto` (or `resume=<run dir>`) continues exactly.
    A signal that arrives before training starts, or a stop Lightning raises itself, still saves the state
    in `on_exception`. Under SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's (it saves
    `hpc_ckpt_*.ckpt` and requeues the job). A handler that was there before (submitit's SIGUSR2 / SIGTERM:
    requeue the job, `hydra/launcher=slurm`) is called once the checkpoint is written and training has
    stopped, so the requeued job resumes from this step (with `resume=auto`).

    Args:
        dirpath: the run directory.
        filename: the checkpoint written on a stop (`last.ckpt`: the run's latest state).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self._previous: dict[int, Any] = {}
        self.requested = False
        self._signal: int | None = None
        self._saved_step = -1

    def _request(self, signum, frame) -> None:
        log.info("received signal %d: stopping at the end of this optimizer step with a checkpoint", signum)
        self.requested = True
        self._signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):  # not claimed by SLURM auto-requeue
            signals.append(signal.SIGUSR1)
        if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's timeout/preemption signal: requeue after us
            signals.append(signal.SIGUSR2)
        for signum in signals:
            with contextlib.suppress(ValueError):  # not the main thread: keep Lightning's handling
                self._previous[signum] = signal.signal(signum, self._request)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.save(trainer)
        trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, Checkpoint)), None)
        if checkpoint is not None and checkpoint.last == self.path:
            if checkpoint._last_saved_step != trainer.global_step:
                checkpoint.save(trainer, with_step=False)
        else:
            trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step
        log.info("stopped by a signal at step %d; checkpoint %s", trainer.global_step, self.path)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        chained = previous.get(self._signal) if self._signal is not None else None
        if callable(chained) and self._saved_step >= 0:
            log.info(
                "passing signal %d on to the handler that was installed before (e.g. submitit's requeue)", self._signal
            )
            chained(self._signal, None)


def _final_step(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is the last one of the fit (max_steps or the last epoch's end)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    progress = trainer.fit_loop.epoch_loop.batch_progress
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch and progress.is_last_batch)


class Checkpoint(L.Callback):
    """The run's checkpoints, written atomically (the run's `AtomicCheckpointIO`).

    - every `every_n_train_steps` optimizer steps: `step_<step>.ckpt`, of which the last `keep_last` are kept,
      and `last.ckpt` (a hard link to the same file where the file system allows, else a second write);
    - every `every_n_minutes` of training in between, and when training ends: `last.ckpt`.

    `last.ckpt` is always the latest saved state; `resume=auto` picks the highest step among all of them.

    Args:
        dirpath: the run directory.
        every_n_train_steps: period of the step checkpoints (0: none).
        keep_last: step checkpoints kept (-1: all, 0: none, only last.ckpt).
        every_n_minutes: period of the timed `last.ckpt` refresh (null or 0: off).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 5000,
        keep_last: int = 3,
        every_n_minutes: float | None = 30.0,
    ):
        if every_n_train_steps < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps} must be >= 0")
        if keep_last < -1:
            raise ValueError(f"callbacks.checkpoint.keep_last={keep_last} must be -1 (all), 0 or a positive integer")
        if every_n_minutes is not None and every_n_minutes < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_minutes={every_n_minutes} must be >= 0 (or null: off)")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps, self.keep_last = int(every_n_train_steps), int(keep_last)
        self.every_n_seconds = float(every_n_minutes) * 60 if every_n_minutes else None
        self._last_saved_step = -1
        self._last_time = time.monotonic()

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def step_path(self, step: int) -> Path:
        return self.dirpath / f"step_{step:07d}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._last_time = time.monotonic()
        self._last_saved_step = trainer.global_step  # a resumed run does not rewrite the checkpoint it came from

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_saved_step or trainer.fit_loop._should_accumulate():
            return
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            self.save(trainer, with_step=True)
            return
        if _final_step(trainer):  # saved here, in the same loop state as every other checkpoint
            self.save(trainer, with_step=False)
            return
        if self.every_n_seconds is None:
            return
        due = time.monotonic() - self._last_time >= self.every_n_seconds
        if trainer.strategy.broadcast(due):  # rank 0 decides, so every rank saves together
            self.save(trainer, with_step=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_saved_step:  # stopped early (should_stop): keep the state
            self.save(trainer, with_step=False)

    def save(self, trainer: L.Trainer, with_step: bool) -> None:
        """Write `step_<step>.ckpt` (with_step) and `last.ckpt`; prune old step checkpoints (rank 0)."""
        step = trainer.global_step
        if with_step and self.keep_last != 0:
            path = self.step_path(step)
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                self._link_last(path, trainer)
                self._prune()
        else:
            trainer.save_checkpoint(self.last, weights_only=False)
        trainer.strategy.barrier("latentdiff.checkpoint")
        self._last_saved_step, self._last_time = step, time.monotonic()

    def _link_last(self, path: Path, trainer: L.Trainer) -> None:
        tmp = self.dirpath / f".last.ckpt.link-{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # no hard links here: write it again (atomically)
            tmp.unlink(missing_ok=True)
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(state, self.last)

    def _prune(self) -> None:
        if self.keep_last < 0:
            return
        pattern = re.compile(r"step_(\d+)\.ckpt$")
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step_*.ckpt") if (m := pattern.search(p.name)))
        for _, path in steps[: max(len(steps) - self.keep_last, 0)]:
            path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_saved_step = int(state.get("last_saved_step", -1))
