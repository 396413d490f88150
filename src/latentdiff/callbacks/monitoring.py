"""What a run shows while it trains: the loss-curve plot, the progress bar and the throughput (samples/s, MFU).

None of them waits for the device inside a step: losses stay on the device until a plot or a refresh reads them,
and the throughput synchronises once per log interval.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from latentdiff.lightning_internals import logs_this_step, peak_flops

log = logging.getLogger(__name__)


class LossCurve(L.Callback):
    """Plots `train/loss` (raw and smoothed) and `val/loss` against steps into `<path>` (PNG).

    Args:
        path: output PNG file.
        every_n_steps: record the training loss every this many steps.
        smoothing: EMA factor per recorded point of the smoothed training curve, debiased (`debiased_ema`); 0.8
            every 10 steps averages about the last 50 steps (on the quickstart at step 399 it reads 0.31 where the
            losses of the last 60 steps average 0.30; the EMA 0.95 started at the first loss read 0.62).
    """

    def __init__(self, path: str, every_n_steps: int = 10, smoothing: float = 0.8):
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

    def plot(self, trainer: L.Trainer) -> None:
        """Write the PNG (rank 0) with the losses recorded so far."""
        self._read()
        if not trainer.is_global_zero or not self.train:
            return
        from matplotlib.figure import Figure  # no pyplot: no GUI backend is chosen

        fig = Figure(figsize=(7, 4), dpi=120)
        ax = fig.add_subplot()
        steps, losses = zip(*self.train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train/loss")
        ax.plot(steps, debiased_ema(losses, self.smoothing), color="tab:blue", lw=1.8, label=self._smoothed_label())
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

    def _smoothed_label(self) -> str:
        return f"train/loss, smoothed (EMA {self.smoothing:g} per {self.every_n_steps} steps, debiased)"


def debiased_ema(values: list[float], smoothing: float) -> list[float]:
    """The exponential moving average of `values`, debiased as Adam's moments and TensorBoard's smoothing are:
    started at 0 and divided by `1 - smoothing**t`, so the first values are not held over the whole curve (an EMA
    started at the first loss lags far behind a falling loss)."""
    out, acc = [], 0.0
    for t, value in enumerate(values, start=1):
        acc = smoothing * acc + (1 - smoothing) * value
        out.append(acc / (1 - smoothing**t))
    return out


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
        self.flops_per_sample = train_flops_per_sample(pl_module)
        if self.peak_tflops is None:
            peak = peak_flops(trainer)
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
        if not logs_this_step(trainer):
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


def train_flops_per_sample(pl_module: L.LightningModule) -> float | None:
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
