"""Training throughput: img/s, TFLOP/s and MFU per preset, eager vs compiled, fp32 vs bf16; Lightning vs a bare loop.

    python bench/train.py                                   # this machine's defaults (a few minutes on 2 CPU cores)
    python bench/train.py --device cuda --data latents --models uvit_s2,uvit_l2,uvit_h2 --batch 128,256 \\
        --precision bf16 --compile eager,model --steps 30 --warmup 10 --out outputs/bench/train_gpu.json

Method. Every training figure is a real `run_training` run (the product's Lightning loop with its callbacks:
throughput, loss curve, checkpointing, preemption, the non-finite guard, gradient clipping, AdamW, EMA), minus
validation, sample grids and checkpoint files. img/s counts the optimizer steps after `--warmup` steps (which hold
compilation), with the device synchronized at both ends. FLOPs per image are 3x the forward FLOPs counted by
`latentdiff.flops` (forward + backward; the convention of the U-ViT/DiT MFU figures); MFU divides the achieved rate
by a matmul peak measured here in the same precision (fp32 at PyTorch's default matmul precision, i.e. no TF32).
Data: `shapes` (the built-in 32x32x3 pixel data, 4 classes) or `latents` (a store of 4x32x32 latents, 1000
classes: the tensor shapes of ImageNet-256 with the SD VAE). The bare loop runs the same module, data loader,
optimizer, LR schedule, clipping and EMA in a plain `for` loop. Component rows time one piece on its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import (  # noqa: E402
    StepTimer,
    environment,
    fmt,
    identity_store,
    matmul_peak,
    pick_device,
    sync,
    table,
    write_json,
)
from tests.conftest import compose_config  # noqa: E402

PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE = {"eager": "module.compile=false", "blocks": "module.compile={scope:blocks}", "model": "module.compile=true"}
CPU_BATCH = {"uvit_tiny": 32, "unet_tiny": 32}  # the other presets: 8 on a CPU
CPU_STEPS = {"uvit_tiny": (3, 20), "unet_tiny": (3, 20)}  # (warm-up, timed); the other presets: (1, 3)


def run_overrides(args: argparse.Namespace, model: str, batch: int, precision: str, compile: str) -> list[str]:
    """The overrides of one measured run."""
    warmup, steps = steps_for(args, model)
    overrides = [
        f"model={model}",
        f"data.batch_size={batch}",
        f"trainer.precision={PRECISION[precision]}",
        f"trainer.accelerator={args.device.type}",
        f"trainer.max_steps={warmup + steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks.sample_grid=null",
        f"callbacks.checkpoint.every_n_train_steps={10**9}",
        "callbacks.checkpoint.every_n_minutes=null",
        COMPILE[compile],
        "+callbacks.bench_timer._target_=benchlib.StepTimer",
        f"+callbacks.bench_timer.warmup={warmup}",
    ]
    if args.data == "latents":
        overrides += [
            "data=latents",
            f"data.root={args.store}",
            "data.image_size=32",
            "data.channels=4",
            "data.num_classes=1000",
            "data.num_val=16",
            "data.num_workers=2",
            "vae=none",
        ]
    return overrides + args.extra


def steps_for(args: argparse.Namespace, model: str) -> tuple[int, int]:
    if args.steps is not None:
        return args.warmup if args.warmup is not None else 2, args.steps
    if args.device.type == "cuda":
        return 10, 30
    return CPU_STEPS.get(model, (1, 3))


def compiles_for(args: argparse.Namespace, model: str) -> list[str]:
    if args.compiles:
        return args.compiles
    if args.device.type == "cuda":
        return ["eager", "model"]
    return ["eager", "blocks"] if model in CPU_BATCH else ["eager"]


def batches_for(args: argparse.Namespace, model: str) -> list[int]:
    if args.batch:
        return [int(b) for b in args.batch.split(",")]
    return [128] if args.device.type == "cuda" else [CPU_BATCH.get(model, 8)]


def lightning_run(args: argparse.Namespace, model: str, batch: int, precision: str, compile: str, extra=()) -> dict:
    """One `run_training` run; returns img/s over the timed steps and the warm-up wall time."""
    from latentdiff.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*run_overrides(args, model, batch, precision, compile), *extra], Path(tmp))
        StepTimer.runs.clear()
        start = time.perf_counter()
        run_training(cfg)
        total = time.perf_counter() - start
        (timer,) = StepTimer.runs
    return {
        "img_per_s": timer.samples / timer.seconds,
        "ms_per_step": 1e3 * timer.seconds / timer.steps,
        "warmup_s": total - timer.seconds,
        "steps": timer.steps,
    }


def bare_run(args: argparse.Namespace, model: str, batch: int, precision: str, compile: str) -> dict:
    """The same module, data, optimizer, schedule, clipping and EMA in a plain PyTorch loop."""
    from hydra.utils import instantiate
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from latentdiff.data.order import generator_for
    from latentdiff.samplers.cfg import drop_condition
    from latentdiff.train import build_module

    warmup, steps = steps_for(args, model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(run_overrides(args, model, batch, precision, compile), Path(tmp))
        module = build_module(cfg).to(args.device)
        module.configure_model()  # compiles as the Lightning run does
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        optimizers = module.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        scheduler = optimizers["lr_scheduler"]["scheduler"] if isinstance(optimizers, dict) else None
        params = list(module.backbone.parameters())
        clip = cfg.trainer.gradient_clip_val
        module.train()
        t0, samples = None, 0
        for step, batch_data in enumerate(loader):
            if step == warmup:
                sync(args.device)
                t0 = time.perf_counter()
            if step == warmup + steps:
                break
            batch_data = move_data_to_device(batch_data, args.device)
            with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                generator = generator_for(cfg.seed, 0, step, 0, device=args.device)
                x0 = module.autoencoder.model_input(batch_data, generator)
                cond = drop_condition(module.batch_cond(batch_data), module.null_cond, module.p_uncond, generator)
                loss, _ = module.diffusion.loss(module._train_forward, x0, cond, generator=generator)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if module.ema is not None:
                module.ema.update(module.backbone, step)
            if t0 is not None:
                samples += x0.shape[0]
        sync(args.device)
        seconds = time.perf_counter() - t0
    return {"img_per_s": samples / seconds, "ms_per_step": 1e3 * seconds / steps}


def model_cost(args: argparse.Namespace, model: str) -> tuple[float, float]:
    """(parameters in millions, forward GMACs per image) of a preset on the benchmark's data."""
    from latentdiff.flops import config_cost

    with tempfile.TemporaryDirectory() as tmp:
        cost = config_cost(compose_config(run_overrides(args, model, 8, "fp32", "eager"), Path(tmp)))
    return cost.params / 1e6, cost.gmacs


# ------------------------------------------------------------------------------------------------ components
def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def component_rows(args: argparse.Namespace, model: str, batch: int) -> list[dict]:
    """AdamW implementations, the EMA update, and the attention kernel, on `model`'s tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from latentdiff.ema import EMA
    from latentdiff.models.build import build_backbone

    device, rows = args.device, []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(run_overrides(args, model, batch, "fp32", "eager"), Path(tmp))
    backbone = build_backbone(cfg.model).to(device)
    ema = EMA(backbone, decay=0.9999, warmup=False)  # before the gradients exist, as in training
    for p in backbone.parameters():
        p.grad = torch.randn_like(p)
    millions = sum(p.numel() for p in backbone.parameters()) / 1e6

    for impl in ("for-loop", "foreach", "fused"):
        kwargs = {"foreach": impl == "foreach", "fused": impl == "fused"}
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-9, **kwargs)
        rows.append(
            {"component": f"AdamW step ({millions:.1f}M params)", "variant": impl, "ms": timed(optimizer.step, device)}
        )

    pairs = list(zip(ema.model.parameters(), backbone.parameters(), strict=True))

    def per_tensor() -> None:
        with torch.no_grad():
            for e, p in pairs:
                e.mul_(0.9999).add_((1 - 0.9999) * p)

    rows.append({"component": "EMA update", "variant": "per-tensor loop", "ms": timed(per_tensor, device)})
    rows.append(
        {"component": "EMA update", "variant": "foreach lerp", "ms": timed(lambda: ema.update(backbone, 1), device)}
    )

    blocks = getattr(backbone, "in_blocks", None)
    if blocks is not None:  # a U-ViT: its attention shape
        tokens = backbone.pos_embed.shape[1]
        heads = blocks[0].attn.num_heads
        dim = backbone.embed_dim // heads
        for precision in args.precisions:
            q, k, v = (
                torch.randn(batch, heads, tokens, dim, device=device, dtype=DTYPE[precision], requires_grad=True)
                for _ in range(3)
            )

            def attention(backend: SDPBackend, q=q, k=k, v=v) -> None:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

            shape = f"attention fwd+bwd {precision} ({batch}x{heads}x{tokens}x{dim})"
            flash = SDPBackend.FLASH_ATTENTION
            rows.append(
                {
                    "component": shape,
                    "variant": "math (unfused)",
                    "ms": timed(lambda: attention(SDPBackend.MATH), device),
                }
            )
            rows.append({"component": shape, "variant": "flash", "ms": timed(lambda b=flash: attention(b), device)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="uvit_tiny,unet_tiny,uvit_s2,unet", help="model presets (conf/model/)")
    parser.add_argument(
        "--batch", default="", help="global batch, or a comma list (default: 8, tiny presets 32; 128 on GPU)"
    )
    parser.add_argument("--precision", default="", help="fp32,bf16 (default: both where the device has bf16)")
    parser.add_argument(
        "--compile",
        default="",
        help="eager, blocks (per-block torch.compile), model; default: eager,model on GPU, on CPU eager,blocks for the "
        "tiny presets and eager for the others (compiling them takes minutes on 2 cores)",
    )
    parser.add_argument("--data", default="shapes", choices=["shapes", "latents"])
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default by device and model)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--bare", default="eager", help="compile modes that also run the bare loop (none: skip; CPU: tiny presets)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved Lightning/bare rounds, best of each")
    parser.add_argument("--no-options", action="store_true", help="skip the option rows (checkpointing, channels_last)")
    parser.add_argument("--no-components", action="store_true", help="skip the component rows")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "train.json"))
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for every run, e.g. model.depth=13")
    args = parser.parse_args()
    args.device = pick_device(args.device)
    bf16 = (args.device.type == "cuda" and torch.cuda.is_bf16_supported()) or args.device.type == "cpu"
    args.precisions = args.precision.split(",") if args.precision else (["fp32", "bf16"] if bf16 else ["fp32"])
    args.compiles = args.compile.split(",") if args.compile else []
    models = args.models.split(",")
    env = environment(args.device)
    print(
        f"# training throughput -- {env['device']}, torch {env['torch']}, lightning {env['lightning']}, {env['date']}"
    )

    with tempfile.TemporaryDirectory() as store:
        if args.data == "latents":
            need = max(batches_for(args, m)[-1] * (sum(steps_for(args, m)) + 1) for m in models) + 16
            args.store = identity_store(Path(store) / "latents", max(need, 1024), 4, 32, 1000)

        peaks = {p: matmul_peak(args.device, DTYPE[p]) for p in args.precisions}
        print("matmul peak: " + ", ".join(f"{p} {fmt(v)} TFLOP/s" for p, v in peaks.items()))

        runs, bare, extras = [], [], []
        for model in models:
            params, gmacs = model_cost(args, model)
            for batch in batches_for(args, model):
                for precision in args.precisions:
                    for compile in compiles_for(args, model):
                        row = {"model": model, "params_m": params, "gmacs": gmacs, "batch": batch}
                        row.update(precision=precision, compile=compile)
                        row.update(lightning_run(args, model, batch, precision, compile))
                        row["tflops"] = row["img_per_s"] * 6 * gmacs / 1e3
                        row["mfu"] = row["tflops"] / peaks[precision]
                        runs.append(row)
                        print(
                            f"  {model} batch {batch} {precision} {compile}: {fmt(row['img_per_s'])} img/s", flush=True
                        )
                        if compile in args.bare.split(",") and (args.device.type == "cuda" or model in CPU_BATCH):
                            # interleaved rounds, best of each: this shared CPU's speed drifts by +-25%
                            loop = bare_run(args, model, batch, precision, compile)
                            for _ in range(args.repeats - 1):
                                again = lightning_run(args, model, batch, precision, compile)
                                row["img_per_s"] = max(row["img_per_s"], again["img_per_s"])
                                again = bare_run(args, model, batch, precision, compile)
                                loop["img_per_s"] = max(loop["img_per_s"], again["img_per_s"])
                            bare.append(
                                {
                                    "model": model,
                                    "batch": batch,
                                    "precision": precision,
                                    "compile": compile,
                                    "lightning_img_per_s": row["img_per_s"],
                                    "bare_img_per_s": loop["img_per_s"],
                                    "ratio": row["img_per_s"] / loop["img_per_s"],
                                }
                            )
                            row["tflops"] = row["img_per_s"] * 6 * gmacs / 1e3
                            row["mfu"] = row["tflops"] / peaks[precision]
            if not args.no_options:
                extras += extra_rows(args, model, runs)

        components = [] if args.no_components else component_rows(args, models[min(1, len(models) - 1)], 8)

    print()
    print(
        table(
            ["model", "params", "GMACs/img", "batch", "precision", "compile", "img/s", "TFLOP/s", "MFU", "warm-up s"],
            [
                [
                    r["model"],
                    f"{r['params_m']:.1f}M",
                    fmt(r["gmacs"]),
                    r["batch"],
                    r["precision"],
                    r["compile"],
                    fmt(r["img_per_s"]),
                    fmt(r["tflops"]),
                    f"{100 * r['mfu']:.1f}%",
                    f"{r['warmup_s']:.0f}",
                ]
                for r in runs
            ],
        )
    )
    if bare:
        print()
        header = ["model", "batch", "precision", "compile", "Lightning img/s", "bare loop img/s", "Lightning / bare"]
        rows = [
            [
                b["model"],
                b["batch"],
                b["precision"],
                b["compile"],
                fmt(b["lightning_img_per_s"]),
                fmt(b["bare_img_per_s"]),
                f"{b['ratio']:.3f}",
            ]
            for b in bare
        ]
        print(table(header, rows))
    if extras:
        print()
        print(
            table(
                ["model", "batch", "precision", "option", "img/s", "vs default"],
                [
                    [e["model"], e["batch"], e["precision"], e["option"], fmt(e["img_per_s"]), f"{e['speedup']:.2f}x"]
                    for e in extras
                ],
            )
        )
    if components:
        print()
        print(table(["component", "variant", "ms"], [[c["component"], c["variant"], fmt(c["ms"])] for c in components]))
    path = write_json(
        args.out,
        {
            "environment": env,
            "data": args.data,
            "matmul_peak_tflops": peaks,
            "runs": runs,
            "lightning_vs_bare": bare,
            "options": extras,
            "components": components,
        },
    )
    print(f"\nwrote {path}")


def extra_rows(args: argparse.Namespace, model: str, runs: list[dict]) -> list[dict]:
    """One option at a time against the preset's eager run in the last precision: what each option buys."""
    options: list[tuple[str, str, list[str]]] = []
    if args.device.type == "cpu" and model not in CPU_BATCH and not args.compiles:
        return []  # minutes each on 2 cores: ask for them with --compile
    if model.startswith("uvit"):
        with tempfile.TemporaryDirectory() as tmp:
            preset = compose_config([f"model={model}"], Path(tmp)).model.use_checkpoint
        flipped = str(not preset).lower()  # what recomputation costs, or what it saves to turn it off
        options.append((f"use_checkpoint={flipped}", "eager", [f"model.use_checkpoint={flipped}"]))
        if "model" not in compiles_for(args, model):
            options.append(("whole-model compile", "model", []))
    if model.startswith("unet"):
        options.append(("channels_last=true", "eager", ["model.channels_last=true"]))
        if "model" not in compiles_for(args, model) and model == "unet_tiny":
            options.append(("whole-model compile", "model", []))
    precision, out = args.precisions[-1], []
    base = {
        (r["batch"]): r for r in runs if r["model"] == model and r["precision"] == precision and r["compile"] == "eager"
    }
    for name, compile, overrides in options:
        for batch, ref in base.items():
            result = lightning_run(args, model, batch, precision, compile, overrides)
            out.append(
                {
                    "model": model,
                    "batch": batch,
                    "precision": precision,
                    "option": name,
                    "img_per_s": result["img_per_s"],
                    "warmup_s": result["warmup_s"],
                    "speedup": result["img_per_s"] / ref["img_per_s"],
                }
            )
            print(f"  {model} batch {batch} {precision} {name}: {fmt(result['img_per_s'])} img/s", flush=True)
    return out


if __name__ == "__main__":
    main()
