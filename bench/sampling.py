"""Sampling and evaluation throughput: the quickstart model per sampler, and Inception features.

    python bench/sampling.py [--batch 32] [--images 256] [--out outputs/bench/sampling.json]

Sampling: `ImageSampler` (what sample.py, the FID callback and the grids use) on `unet_tiny` and on the
quickstart's `uvit_tiny` (32x32 pixels, 4 classes; random weights: the same compute), fp32, CFG w = 2 (two
halves in one batch), every sampler at 20 steps (Heun makes 2 evaluations per step), DDPM at 250; the Gaussian
samplers on `diffusion=cosine_v`, the flow samplers on the quickstart's `diffusion=flow_logit_normal`.
Inception: this project's `Inception.features` on uint8 batches streamed from an npz, next to
`torch_fidelity.calculate_metrics(isc=True)` on the same images as a folder of PNGs, same weights file
(random weights in torch-fidelity's format: the real file cannot be downloaded here; the compute is the same).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.artefacts import make_inception_weights  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

# (sampler, steps, the objective it follows): 20 steps each, except DDPM (its cost is linear in steps)
SAMPLERS = [
    ("dpm_solver", 20, "cosine_v"),
    ("dpm_solver_uvit", 20, "cosine_v"),
    ("ddim", 20, "cosine_v"),
    ("euler", 20, "cosine_v"),
    ("heun", 20, "cosine_v"),
    ("ddpm", 250, "cosine_v"),
    ("flow_euler", 20, "flow_logit_normal"),
    ("flow_heun", 20, "flow_logit_normal"),
]


def bench_sampling(batch: int) -> list[dict]:
    from hydra.utils import instantiate

    from latentdiff.samplers.conditions import class_labels
    from latentdiff.samplers.image import module_sampler
    from latentdiff.train import build_module

    rows = []
    for model, (name, steps, objective) in [(m, s) for m in ("unet_tiny", "uvit_tiny") for s in SAMPLERS]:
        overrides = [f"sampler={name}", f"diffusion={objective}", f"model={model}", "sampler.guidance_scale=2"]
        cfg = compose_config([*overrides, f"sampler.steps={steps}"])
        module = build_module(cfg).eval()
        module.latent_shape = (3, 32, 32)
        steps = int(cfg.sampler.steps)
        sampler = module_sampler(module, instantiate(cfg.sampler.scheduler), steps, guidance_scale=2.0)
        evaluations = sampler.steps * 2 - 1 if name.endswith("heun") else sampler.steps
        indices = list(range(batch))
        labels = class_labels(indices, 4, 0)
        sampler.images(indices[:4], labels[:4])  # warm-up
        start = time.perf_counter()
        sampler.images(indices, labels)
        seconds = time.perf_counter() - start
        row = {"model": model, "sampler": name, "steps": steps, "evaluations": evaluations}
        rows.append({**row, "images_per_s": batch / seconds})
        print(f"sampling {model:10s} {name:16s} {steps:5d} steps {batch / seconds:8.2f} img/s", flush=True)
    return rows


def bench_inception(count: int, tmp: Path) -> dict:
    import torch_fidelity
    import torchvision

    from latentdiff.data import render_shapes
    from latentdiff.inception import Inception
    from latentdiff.metrics import NpzImages

    weights = make_inception_weights(tmp / "inception.pth")
    images, _ = render_shapes(count, image_size=32, seed=0)
    np.savez(tmp / "set.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    folder = tmp / "set"
    folder.mkdir()
    for i, image in enumerate(images):
        torchvision.io.write_png(image, str(folder / f"{i:05d}.png"))
    inception = Inception(str(weights), batch_size=64)
    start = time.perf_counter()
    inception.features(NpzImages(tmp / "set.npz").batches(), total=count)
    ours = count / (time.perf_counter() - start)
    start = time.perf_counter()
    torch_fidelity.calculate_metrics(
        input1=str(folder),
        isc=True,
        cuda=False,
        batch_size=64,
        feature_extractor_weights_path=str(weights),
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    theirs = count / (time.perf_counter() - start)
    print(f"inception  latentdiff (npz stream) {ours:8.2f} img/s   torch-fidelity (PNG folder) {theirs:8.2f} img/s")
    return {"images": count, "latentdiff_images_per_s": ours, "torch_fidelity_images_per_s": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "sampling.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
            "torch": torch.__version__,
            "sampling": bench_sampling(args.batch),
            "inception": bench_inception(args.images, Path(tmp)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
