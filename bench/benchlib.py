"""Shared pieces of the benchmarks: the device line, a measured matmul peak, a step timer, synthetic stores.

Not a test helper: figures are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """One line naming the device, e.g. `NVIDIA H100 80GB HBM3` or `CPU: Intel(R) Xeon(R) ... (2 threads)`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """What a figure was measured on: device, date, library versions."""
    import diffusers
    import lightning

    return {
        "device": describe_device(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.5) -> float:
    """The device's measured dense matmul rate in TFLOP/s: the best of repeated `size x size` products.

    fp32 on a GPU is measured at PyTorch's default ("highest") matmul precision, i.e. without TF32.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: library handles, kernel choice
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        best = max(best, 3 * 2 * size**3 / (time.perf_counter() - t0) / 1e12)
    return best


class StepTimer(L.Callback):
    """Wall time of training steps `warmup + 1 .. max_steps` (device synchronized at both ends).

    Instances register themselves in `StepTimer.runs` so a benchmark can read the figure after `run_training`.
    """

    runs: ClassVar[list[StepTimer]] = []

    def __init__(self, warmup: int):
        self.warmup = int(warmup)
        self.t0: float | None = None
        self.steps, self.samples, self.seconds = 0, 0, float("nan")
        StepTimer.runs.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            sync(trainer.strategy.root_device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from latentdiff.data.order import batch_items

        if self.t0 is not None and self.seconds != self.seconds:
            self.steps += 1
            self.samples += batch_items(batch)
            if trainer.global_step >= trainer.max_steps:  # before the final checkpoint is written
                sync(trainer.strategy.root_device)
                self.seconds = time.perf_counter() - self.t0


def identity_store(root: Path, items: int, channels: int, size: int, num_classes: int, seed: int = 0) -> Path:
    """A latent store in the pixel ("identity") format, written by the real shard writer.

    Shapes are those of a real latent store (e.g. 4 x 32 x 32, as ImageNet-256 with the SD VAE), so a backbone
    trained from it computes exactly what it computes on real latents; only the VAE posterior draw (one
    element-wise op per batch) is missing. Use with `vae=none data.channels=<channels>`.
    """
    from latentdiff.data.store import FORMAT, VERSION, write_shard
    from latentdiff.files import write_json

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    moments = rng.standard_normal((items, 2, channels, size, size), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, num_classes, items) if num_classes else np.zeros(items, dtype=np.int64)
    write_shard(root, 0, {"moments": moments, "labels": labels}, {"count": items, "skipped": []})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": items,
        "num_shards": 1,
        "resolution": size,
        "latent_shape": [channels, size, size],
        "views": 2,
        "num_classes": num_classes,
        "text": None,
        "vae": {"kind": "identity", "channels": channels, "scaling_factor": 1.0},
    }
    write_json(root / "store.json", meta)
    return root


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (what the READMEs carry)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure with `digits` significant digits (thousands separated), or '-' when missing."""
    if value is None or value != value:
        return "-"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
