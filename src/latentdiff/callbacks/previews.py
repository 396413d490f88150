"""Previews of the EMA backbone during training: a sample grid (`SampleGrid`) and FID-N (`FID`).

Both sample as `sample.py` does (the run's sampler, per-index seeds), through one base class.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from latentdiff.lightning_internals import set_callback_metric
from latentdiff.strategies import shards_parameters

log = logging.getLogger(__name__)


class SamplingCallback(L.Callback):
    """A callback that samples the module's EMA backbone with a configured sampler (`conf/sampler`)."""

    scheduler_partial: Callable
    steps: int
    guidance_scale: float
    guidance_interval: list[float] | None
    step_kwargs: dict[str, Any]
    seed: int

    @staticmethod
    @contextlib.contextmanager
    def evaluating(pl_module: L.LightningModule) -> Iterator[None]:
        """The module in eval mode for the block, then back in the mode it was in."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            yield
        finally:
            pl_module.train(was_training)

    def sampler(self, pl_module: L.LightningModule) -> Any:
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


class SampleGrid(SamplingCallback):
    """Every `every_n_steps` optimizer steps (and at the end), sample a grid with the EMA backbone.

    Rows are classes (class-conditional data), each labelled with its name (`class_names` of the datamodule)
    or id, and columns are samples; unconditional runs give a square grid. The start noise is the same at every
    step, so successive grids show the same "seeds" learning. Files: `<dirpath>/step_0001000.png`; the image is
    also sent to TensorBoard / wandb when they log. On the built-in shapes the judge (`latentdiff.judge`) scores
    the grid's samples: `val/shape_acc`, `val/fd_shapes` and its floor `val/fd_shapes_floor`, logged at the step.

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
        judge: score the grid with the shapes judge on shapes runs (class-conditional `data=shapes`).

    The ranges of the arguments are checked with the run config (`latentdiff.rules`, `callbacks.sample_grid.*`).
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
        judge: bool = True,
    ):
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
        self.seed, self.judge = seed, bool(judge)
        self._last_step = -1
        self.prompts: tuple[torch.Tensor, list[str]] | None = None  # text runs: (N, L, D) features, captions
        self.class_names: tuple[str, ...] | None = None
        self._judge = None  # the shapes judge, on shapes runs

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Text runs sample the datamodule's held-out captions (`prompts(n)`), the same ones at every step."""
        from latentdiff.data.shapes import ShapesDataModule

        datamodule = getattr(trainer, "datamodule", None)
        if getattr(pl_module, "null_text", None) is not None and hasattr(datamodule, "prompts"):
            self.prompts = datamodule.prompts(self.num_samples)
        self.class_names = getattr(datamodule, "class_names", None)
        shapes = isinstance(datamodule, ShapesDataModule) and pl_module.num_classes > 0
        if self.judge and shapes and trainer.is_global_zero:
            from latentdiff.judge import load_judge

            try:
                self._judge = load_judge(datamodule.image_size)  # trained once per machine (~40 s), then read
            except (RuntimeError, OSError) as err:  # e.g. shapes too small to tell apart: train without scores
                log.warning("the shapes judge is off for this run: %s", err)

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
    def make_grid(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sample and decode the grid: (the (3, H, W) float image in [0, 1], the samples (B, H, W, 3) uint8, their
        class ids (B,) or None)."""
        cond, ncol = self._conditions(pl_module)
        count = len(cond) if cond is not None else self.num_samples
        samples = self.sampler(pl_module).images(list(range(count)), cond)  # (B, H, W, 3) uint8
        grid = torchvision.utils.make_grid(
            samples.permute(0, 3, 1, 2).float() / 255, nrow=ncol, padding=2, pad_value=1.0
        )
        labels = cond if cond is not None and not cond.is_floating_point() else None
        if labels is not None:
            rows = labels[::ncol].tolist()
            grid = label_rows(grid, [self._name(c) for c in rows])
        return grid, samples, labels

    def _name(self, class_id: int) -> str:
        names = self.class_names
        return names[class_id] if names is not None and class_id < len(names) else f"class {class_id}"

    def _save(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        every_rank = shards_parameters(trainer)  # FSDP: each forward needs all ranks; they draw the same grid
        if step == self._last_step or not (trainer.is_global_zero or every_rank):
            return
        self._last_step = step
        with self.evaluating(pl_module):
            grid, samples, labels = self.make_grid(pl_module)
        if not trainer.is_global_zero:
            return
        if self._judge is not None and labels is not None and len(labels) >= 2:
            self._log_scores(trainer, samples, labels)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, self.dirpath / f"step_{step:07d}.png")
        if self.prompts is not None:  # the captions of the grid, row by row
            (self.dirpath / "prompts.txt").write_text("\n".join(self.prompts[1]) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=step)

    def _log_scores(self, trainer: L.Trainer, samples: torch.Tensor, labels: torch.Tensor) -> None:
        from latentdiff.judge import judge_samples

        scores = {f"val/{k}": v for k, v in judge_samples(samples.cpu(), labels.cpu(), self._judge).items()}
        for name, value in scores.items():
            set_callback_metric(trainer, name, torch.tensor(value))  # the run's summary, monitors
        for logger in trainer.loggers:  # on the row of this optimizer step's loss (Lightning counts from 0)
            logger.log_metrics(scores, step=max(trainer.global_step - 1, 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


def label_rows(grid: torch.Tensor, names: list[str]) -> torch.Tensor:
    """`grid` (3, H, W) in [0, 1] of len(names) equal rows, with each row's name written in a white margin on the
    left."""
    from PIL import Image, ImageDraw, ImageFont

    _, height, width = grid.shape
    row = height / max(len(names), 1)
    font = ImageFont.load_default(size=max(8, min(14, int(row * 0.4))))
    margin = int(max(font.getlength(n) for n in names)) + 8 if names else 0
    canvas = Image.new("RGB", (width + margin, height), "white")
    canvas.paste(torchvision.transforms.functional.to_pil_image(grid.clamp(0, 1)), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((margin - 4, (i + 0.5) * row), name, fill="black", font=font, anchor="rm")
    return torchvision.transforms.functional.pil_to_tensor(canvas).float() / 255


def metric_name(num_samples: int) -> str:
    """`val/fid_10k` for 10000 samples, `val/fid_500` for 500."""
    n = int(num_samples)
    return f"val/fid_{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"val/fid_{n}"


class FID(SamplingCallback):
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
        from latentdiff.samplers.flow_ode import adaptive_method

        open_images(self.reference_path, "callbacks.fid.reference")
        method = adaptive_method(self.scheduler_partial)
        if method is not None and shards_parameters(trainer):  # each rank's samples take their own number of
            raise ValueError(  # solver steps, but every FSDP forward needs all ranks: they would wait forever
                f"callbacks.fid with sampler.scheduler.method={method} (adaptive) cannot run under FSDP: the ranks "
                "would take different numbers of forwards; use a fixed-grid method (e.g. method=euler) or "
                "sampler=flow_euler"
            )

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
            set_callback_metric(trainer, self.name, torch.tensor(fid))  # for monitors and the run's summary
            if trainer.is_global_zero:  # once, at this step (self.log would repeat it until the epoch ends)
                for logger in trainer.loggers:
                    logger.log_metrics({self.name: fid}, step=step)
            if fid < self.best:
                self.best = fid
                if self.dirpath is not None:
                    trainer.save_checkpoint(self.dirpath / "best_fid.ckpt")

    @torch.no_grad()
    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
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
        with self.evaluating(pl_module):
            sampler = self.sampler(pl_module)
            feats = []
            for start in range(0, per_rank, self.batch_size):
                indices = mine[start : start + self.batch_size]
                cond, _ = conditions_for(indices, pl_module.num_classes, self.seed, "uniform", prompts)
                feats.append(self._inception.features([sampler.images(indices, cond)])[FID_LAYER])
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
