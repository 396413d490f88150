"""U-ViT training step: the official implementation (github.com/baofff/U-ViT) next to this project's, side by side.

    python bench/official.py --official <checkout of github.com/baofff/U-ViT> [--configs tiny,s2_cifar]
        [--batch 32|8,32] [--precision fp32,bf16] [--variants eager,blocks,model] [--steps 6] [--warmup 2]
        [--repeats 2] [--use-checkpoint config|off] [--device auto|cpu|cuda] [--out outputs/bench/official.json]

The official code is never part of this project: it is imported at run time from `--official DIR` (default: the
environment variable OFFICIAL_UVIT); without it the script prints one line and exits 0.

One training step = forward, `F.mse_loss(prediction.float(), target)`, backward, AdamW step, EMA update, on fixed
seeded inputs (x_t, integer timesteps in [0, 1000), class labels when the config has classes, target noise).
Official: `libs.uvit.UViT`, `torch.optim.AdamW(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999))` over all
parameters as the official `utils.get_optimizer` builds it, `utils.ema(ema, model, 0.9999)` (one kernel pair per
tensor), and the official gradient checkpointing (reentrant) where the config asks for it.
Ours: `latentdiff.models.uvit.UViT` with the same constructor arguments and the official weights (loaded with
`strict=True`), the same inputs and optimizer hyper-parameters, but `AdamW(fused=True)` and
`latentdiff.ema.EMA(decay=0.9999, warmup=False)` (one fused lerp over all tensors); variant "eager" as is,
"blocks" compiles each block (`latentdiff.compile.compile_blocks`), "model" the whole network (`torch.compile`).
Precision "bf16" wraps forward and loss in `torch.autocast(device, torch.bfloat16)` on both sides.

Before timing, one fp32 step on both sides from identical weights checks that they compute the same thing: the
max |difference| of the forward outputs (expected ~1e-6; a warning above 1e-4), then of the weights and of the
EMA weights after the step (Adam moves a weight by about lr = 2e-4 on its first step, so a tiny gradient whose
sign flips with rounding can differ by up to 2 lr there).
Timing: `--warmup` steps (compilation happens there), then `--steps` steps, each read with `time.perf_counter()`
(after `torch.cuda.synchronize()` on CUDA); images/s = batch * steps / timed seconds. The sides are interleaved
(official, then each of our variants) and the whole set is run `--repeats` times; the best images/s of each side
is reported. On CUDA the peak memory of the timed steps is recorded per side (`max_memory_allocated`, reset before
each side), absolute and above what was resident when the timed steps began (activations, gradients, optimizer
temporaries: what checkpointing trades for recompute). The thread count is torch's default.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

SKIP_LINE = "official U-ViT: skipped (pass --official <checkout of github.com/baofff/U-ViT> or set OFFICIAL_UVIT)"

# Official constructor keyword arguments (configs/*.py `config.nnet`, without `name`).
_LATENT = dict(img_size=32, patch_size=2, in_chans=4, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, conv=False)
CONFIGS: dict[str, dict] = {
    "tiny": dict(
        img_size=32,
        patch_size=4,
        in_chans=3,
        embed_dim=256,
        depth=7,
        num_heads=8,
        mlp_ratio=4,
        qkv_bias=False,
        mlp_time_embed=False,
        num_classes=11,
        use_checkpoint=False,
        conv=True,
    ),
    # configs/cifar10_uvit_small.py (unconditional)
    "s2_cifar": dict(
        img_size=32,
        patch_size=2,
        in_chans=3,
        embed_dim=512,
        depth=12,
        num_heads=8,
        mlp_ratio=4,
        qkv_bias=False,
        mlp_time_embed=False,
        num_classes=-1,
        conv=True,
    ),
    # U-ViT-S/2 on ImageNet-256 latents (32x32x4 with the SD VAE)
    "s2": dict(**_LATENT, embed_dim=512, depth=12, num_heads=8, num_classes=1001),
    # configs/imagenet256_uvit_large.py and the huge model of the paper
    "l2": dict(**_LATENT, embed_dim=1024, depth=20, num_heads=16, num_classes=1001, use_checkpoint=True),
    "h2": dict(**_LATENT, embed_dim=1152, depth=28, num_heads=16, num_classes=1001, use_checkpoint=True),
}
CPU_BATCH = {"tiny": 32, "s2_cifar": 8}  # other configs on a CPU: 8
GPU_BATCH = 128
VARIANTS = ("eager", "blocks", "model")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
ADAMW = dict(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999))  # the official recipe (utils.get_optimizer)
EMA_DECAY = 0.9999
FORWARD_TOLERANCE = 1e-4


@dataclass
class Inputs:
    """One fixed batch, the same tensors for both sides."""

    x: torch.Tensor  # (B, C, H, W) noisy input
    t: torch.Tensor  # (B,) long timesteps
    y: torch.Tensor | None  # (B,) long class labels, or None (unconditional)
    target: torch.Tensor  # (B, C, H, W) noise to predict


@dataclass
class Side:
    """A model with its optimizer and EMA; `step` is one training step."""

    name: str
    model: nn.Module  # the trained weights (not the compiled wrapper)
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    optimizer: torch.optim.Optimizer
    ema_update: Callable[[int], None]
    ema_model: nn.Module
    steps_done: int = field(default=0)

    def step(self, inputs: Inputs, dtype: torch.dtype | None) -> torch.Tensor:
        device_type = inputs.x.device.type
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            prediction = self.forward(inputs.x, inputs.t, inputs.y)
            loss = F.mse_loss(prediction.float(), inputs.target)
        loss.backward()
        self.optimizer.step()
        self.ema_update(self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return prediction.detach()


def import_official(directory: str | None) -> tuple[type[nn.Module], ModuleType] | None:
    """The official `libs.uvit.UViT` and `utils` module from a checkout, or None without a usable checkout."""
    if not directory or not (Path(directory) / "libs" / "uvit.py").is_file():
        return None
    directory = str(Path(directory).resolve())
    for name in ("libs", "libs.uvit", "libs.timm", "utils"):
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "")).startswith(directory):
            raise SystemExit(
                f"a module named {name!r} is already imported from {module.__file__}: run in a fresh process"
            )
    sys.path.insert(0, directory)
    try:
        import utils as official_utils  # needs absl, tqdm, torchvision
        from libs.uvit import UViT as OfficialUViT  # prints "attention mode is ..."
    finally:
        sys.path.remove(directory)  # the checkout's top-level names (utils, sde, configs) shadow nothing else
    return OfficialUViT, official_utils


def official_revision(directory: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(kwargs: dict, batch: int, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    classes = kwargs.get("num_classes", -1)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device) if classes > 0 else None
    target = torch.randn(shape, generator=gen)
    return Inputs(x.to(device), t.to(device), y, target.to(device))


def official_side(
    official_cls: type[nn.Module], official_utils: ModuleType, kwargs: dict, device: torch.device
) -> Side:
    torch.manual_seed(0)
    model = official_cls(**kwargs).to(device).train()
    ema_model = copy.deepcopy(model).eval()  # the official train state: a second network, updated with utils.ema
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    return Side(
        name="official",
        model=model,
        forward=lambda x, t, y: model(x, t, y=y),
        optimizer=optimizer,
        ema_update=lambda step: official_utils.ema(ema_model, model, EMA_DECAY),
        ema_model=ema_model,
    )


def our_side(variant: str, kwargs: dict, state: dict, device: torch.device) -> Side:
    from latentdiff.compile import compile_blocks
    from latentdiff.ema import EMA
    from latentdiff.models.uvit import UViT

    model = UViT(**kwargs).to(device).train()
    model.load_state_dict(state, strict=True)
    ema = EMA(model, decay=EMA_DECAY, warmup=False)  # copied before any compilation
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=True)
    forward: Callable = model
    if variant == "blocks":
        compile_blocks(model)  # each block in place, as module.compile={scope:blocks}
    elif variant == "model":
        forward = torch.compile(model)
    return Side(
        name=f"ours {variant}",
        model=model,
        forward=forward,
        optimizer=optimizer,
        ema_update=lambda step: ema.update(model, step),
        ema_model=ema.model,
    )


def max_difference(a: nn.Module, b: nn.Module) -> float:
    """Max |a - b| over the parameters, matched by name."""
    theirs = dict(b.named_parameters())
    return max((p.detach() - theirs[n].detach()).abs().max().item() for n, p in a.named_parameters())


def correctness(official: Side, ours: Side, inputs: Inputs) -> dict:
    """One fp32 training step on both sides from the same weights: output, weight and EMA differences."""
    out_official = official.step(inputs, None)
    out_ours = ours.step(inputs, None)
    return {
        "forward_max_abs_diff": (out_official - out_ours).abs().max().item(),
        "forward_max_abs_official": out_official.abs().max().item(),
        "weights_after_step_max_abs_diff": max_difference(official.model, ours.model),
        "ema_after_step_max_abs_diff": max_difference(official.ema_model, ours.ema_model),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(side: Side, inputs: Inputs, dtype: torch.dtype | None, warmup: int, steps: int) -> dict:
    """Warm-up steps, then `steps` timed steps; images/s, ms/step and, on CUDA, peak memory."""
    device = inputs.x.device
    for _ in range(warmup):
        side.step(inputs, dtype)
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        side.step(inputs, dtype)
        synchronize(device)
        times.append(time.perf_counter() - start)
    total = sum(times)
    batch = inputs.x.shape[0]
    result = {
        "images_per_s": batch * steps / total,
        "ms_per_step": 1000 * total / steps,
        "step_ms": [1000 * s for s in times],
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result |= {"peak_allocated_gib": peak / 2**30, "peak_above_resident_gib": (peak - resident) / 2**30}
    return result


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["images_per_s"])


def bench_group(
    name: str, kwargs: dict, batch: int, args: argparse.Namespace, official: tuple, device: torch.device
) -> list[dict]:
    """Every precision of one (config, batch): a correctness check, then the interleaved timings."""
    torch._dynamo.reset()  # fresh compilation per model and shape
    reference = official_side(*official, kwargs, device)
    state = reference.model.state_dict()
    ours = {v: our_side(v, kwargs, state, device) for v in args.variants}
    checker = ours.get("eager") or our_side("eager", kwargs, state, device)
    inputs = make_inputs(kwargs, batch, device)
    check = correctness(reference, checker, inputs)
    del checker  # a check-only instance unless "eager" is timed
    print(
        f"correctness {name} batch {batch} fp32: forward max |ours - official| = {check['forward_max_abs_diff']:.2e} "
        f"(outputs up to {check['forward_max_abs_official']:.2f}); after one step: weights "
        f"{check['weights_after_step_max_abs_diff']:.2e}, EMA {check['ema_after_step_max_abs_diff']:.2e} "
        f"(lr {ADAMW['lr']:g})",
        flush=True,
    )
    if check["forward_max_abs_diff"] > FORWARD_TOLERANCE:
        print(
            f"WARNING: {name}: forward outputs differ by {check['forward_max_abs_diff']:.2e} > {FORWARD_TOLERANCE:g}: "
            "the two implementations do not compute the same thing",
            flush=True,
        )
    sides = [reference, *ours.values()]
    rows = []
    for precision in args.precision:
        dtype = PRECISIONS[precision]
        runs: dict[str, list[dict]] = {side.name: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides:
                run = measure(side, inputs, dtype, args.warmup, args.steps)
                runs[side.name].append(run)
                memory = f"  peak {run['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in run else ""
                print(
                    f"  {name} batch {batch} {precision} repeat {repeat + 1}: {side.name:12s} "
                    f"{rate(run['images_per_s']):>9s} img/s {run['ms_per_step']:9.1f} ms/step{memory}",
                    flush=True,
                )
        results = {side_name: {"best": best(side_runs), "runs": side_runs} for side_name, side_runs in runs.items()}
        official_rate = results["official"]["best"]["images_per_s"]
        fastest = max(ours, key=lambda v: results[f"ours {v}"]["best"]["images_per_s"])
        rows.append(
            {
                "config": name,
                "kwargs": kwargs,
                "batch": batch,
                "precision": precision,
                "correctness": check,
                "sides": results,
                "best_ours": f"ours {fastest}",
                "speedup": results[f"ours {fastest}"]["best"]["images_per_s"] / official_rate,
            }
        )
    return rows


def rate(images_per_s: float) -> str:
    return f"{images_per_s:,.1f}" if images_per_s >= 10 else f"{images_per_s:.3g}"


def table(rows: list[dict], variants: list[str], cuda: bool) -> str:
    names = ["official", *(f"ours {v}" for v in variants)]
    head = ["config", "batch", "precision", *(f"{n} img/s" for n in names), "speed-up best ours / official"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rates = [rate(row["sides"][n]["best"]["images_per_s"]) for n in names]
        speedup = f"{row['speedup']:.2f}x ({row['best_ours'].removeprefix('ours ')})"
        lines.append(
            f"| {row['config']} | {row['batch']} | {row['precision']} | " + " | ".join([*rates, speedup]) + " |"
        )
    if cuda:
        head = ["config", "batch", "precision", *(f"{n} step memory GiB (peak)" for n in names)]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            cells = [
                f"{row['sides'][n]['best']['peak_above_resident_gib']:.2f} "
                f"({row['sides'][n]['best']['peak_allocated_gib']:.2f})"
                for n in names
            ]
            lines.append(f"| {row['config']} | {row['batch']} | {row['precision']} | " + " | ".join(cells) + " |")
        lines.append("step memory: peak above what was resident (all sides' weights, EMA, optimizer state)")
    return "\n".join(lines)


def comma_list(value: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None and (bad := [v for v in items if v not in allowed]):
        raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(allowed)}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=os.environ.get("OFFICIAL_UVIT"), help="checkout of baofff/U-ViT")
    parser.add_argument("--configs", type=lambda v: comma_list(v, tuple(CONFIGS)), help="default: CPU tiny,s2_cifar")
    parser.add_argument("--batch", type=lambda v: [int(b) for b in comma_list(v)], help="default: per config")
    parser.add_argument("--precision", type=lambda v: comma_list(v, tuple(PRECISIONS)), help="default: bf16")
    parser.add_argument("--variants", type=lambda v: comma_list(v, VARIANTS), default=["eager", "blocks"])
    parser.add_argument("--steps", type=int, help="timed steps (default 6 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each timing (default 2 CPU, 10 GPU)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all sides; the best is reported")
    parser.add_argument("--use-checkpoint", choices=("config", "off"), default="config")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "official.json"))
    args = parser.parse_args()

    official = import_official(args.official)
    if official is None:
        print(SKIP_LINE)
        return
    if not args.variants:
        parser.error("--variants needs at least one of " + ", ".join(VARIANTS))
    if (args.steps is not None and args.steps < 1) or args.repeats < 1 or (args.warmup or 0) < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    # the official Block calls torch.utils.checkpoint without use_reentrant (the reentrant variant): warned per call
    warnings.filterwarnings("ignore", message="torch.utils.checkpoint: the use_reentrant parameter")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    args.configs = args.configs or (["s2", "l2", "h2"] if gpu else ["tiny", "s2_cifar"])
    args.precision = args.precision or ["bf16"]
    args.steps = (30 if gpu else 6) if args.steps is None else args.steps
    args.warmup = (10 if gpu else 2) if args.warmup is None else args.warmup

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    name = device_name(device)
    threads = torch.get_num_threads()
    print(f"device: {name} ({device.type}, {threads} CPU threads) | torch {torch.__version__} | {date}", flush=True)

    rows = []
    for config in args.configs:
        kwargs = dict(CONFIGS[config])
        if args.use_checkpoint == "off":
            kwargs["use_checkpoint"] = False
        batches = args.batch or [GPU_BATCH if gpu else CPU_BATCH.get(config, 8)]
        for batch in batches:
            rows += bench_group(config, kwargs, batch, args, official, device)

    print()
    print(table(rows, args.variants, gpu))
    result = {
        "date": date,
        "device": {"type": device.type, "name": name, "cpu_threads": threads, "platform": platform.platform()},
        "torch": torch.__version__,
        "official": {"dir": str(Path(args.official).resolve()), "git_commit": official_revision(args.official)},
        "settings": {
            "configs": args.configs,
            "precision": args.precision,
            "variants": args.variants,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "use_checkpoint": args.use_checkpoint,
            "adamw": ADAMW,
            "ema_decay": EMA_DECAY,
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
