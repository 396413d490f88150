"""Training callbacks: EMA sample grids and the loss-curve plot, both written into the run directory."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from latentdiff.diffusion import make_sampling_scheduler, sample_loop


class SampleGrid(L.Callback):
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
        step_kwargs: extra `scheduler.step` arguments (e.g. `eta` for DDIM).
        every_n_steps: sampling period in optimizer steps (0 = only at the end).
        samples_per_class: columns of a class-conditional grid.
        num_samples: size of an unconditional grid.
        max_classes: at most this many class rows (ImageNet has 1000 classes); classes are evenly spaced.
        seed: seed of the start noise.
    """

    def __init__(
        self,
        dirpath: str,
        scheduler: Callable,
        steps: int = 25,
        guidance_scale: float = 1.0,
        step_kwargs: dict[str, Any] | None = None,
        every_n_steps: int = 1000,
        samples_per_class: int = 8,
        num_samples: int = 64,
        max_classes: int = 10,
        seed: int = 0,
    ):
        if every_n_steps < 0:
            raise ValueError(f"callbacks.sample_grid.every_n_steps={every_n_steps} must be >= 0")
        self.dirpath = Path(dirpath)
        self.scheduler_partial = scheduler
        self.steps, self.guidance_scale = steps, guidance_scale
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
        model = pl_module.sampling_backbone
        shape = _latent_shape(pl_module)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((count, *shape), generator=generator).to(pl_module.device)  # (B, C, h, w)
        cond = cond.to(pl_module.device) if cond is not None else None
        scheduler = make_sampling_scheduler(self.scheduler_partial, pl_module.diffusion.scheduler)
        latents = sample_loop(
            model,
            scheduler,
            noise,
            self.steps,
            cond=cond,
            null_cond=pl_module.null_cond(cond),
            guidance_scale=self.guidance_scale,
            generator=generator,
            step_kwargs=self.step_kwargs,
        )
        images = (pl_module.autoencoder.decode(latents).float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W)
        return torchvision.utils.make_grid(images.cpu(), nrow=ncol, padding=2, pad_value=1.0)

    def _save(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            grid = self.make_grid(pl_module)
        finally:
            pl_module.train(was_training)
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


def _latent_shape(pl_module) -> tuple[int, int, int]:
    """(C, h, w) of the backbone's input, read from the module's `latent_shape` attribute."""
    shape = getattr(pl_module, "latent_shape", None)
    if shape is None:
        raise ValueError("the module has no latent_shape; run_training sets it from data.latent_size")
    return tuple(shape)


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
        self.val: dict[str, list[tuple[int, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is not None and (trainer.global_step % self.every_n_steps == 0 or not self.train):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((trainer.global_step, float(loss)))

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
