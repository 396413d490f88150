"""Latent data throughput: the latent loader (memory-mapped shards and RAM) and extraction.

    python bench/loader.py [--items 16384] [--batch 256] [--out outputs/bench/loader.json]

Loader: a synthetic store of 32x32x4 latents (ImageNet-256 with the SD VAE: moments (2, 8, 32, 32) fp16 per
item), read through the real `LatentDataModule.train_dataloader()` (shuffled, a random flip per item) for
one epoch, with 0 and 2 worker processes, memory-mapped and in RAM. The store was just written, so the
memory-mapped figures are page-cache reads (a cold disk is slower; this is the loader's own cost).
Extraction: `run_extraction` on a generated ImageFolder of JPEGs with an AutoencoderKL of the SD VAE's
architecture (random weights: the same compute) at 256 px, and with a tiny VAE at 32 px (the pipeline's
own overhead: decoding, cropping, writing).
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
sys.path.insert(0, str(ROOT / "tests"))


from artefacts import TINY_VAE_FACTOR, make_tiny_vae  # noqa: E402  (tests/ holds the tiny artefacts)


def synthetic_store(root: Path, items: int, shard_size: int = 4096) -> Path:
    """A store of random fp16 moments written with the real shard writer, plus its store.json."""
    from latentdiff.data.store import FORMAT, VERSION, write_shard
    from latentdiff.files import write_json

    rng = np.random.default_rng(0)
    shards = (items + shard_size - 1) // shard_size
    for k in range(shards):
        n = min(shard_size, items - k * shard_size)
        moments = rng.standard_normal((n, 2, 8, 32, 32), dtype=np.float32).astype(np.float16)
        write_shard(root, k, {"moments": moments, "labels": rng.integers(0, 1000, n)}, {"count": n, "skipped": []})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": items,
        "num_shards": shards,
        "resolution": 256,
        "latent_shape": [4, 32, 32],
        "views": 2,
        "num_classes": 1000,
        "text": None,
        "vae": {"kind": "identity"},
    }
    write_json(root / "store.json", meta)
    return root


def bench_loader(store: Path, batch: int, workers: int, in_memory: bool) -> float:
    from latentdiff.data import LatentDataModule

    dm = LatentDataModule(
        str(store),
        image_size=256,
        num_classes=1000,
        batch_size=batch,
        num_workers=workers,
        in_memory=in_memory,
        pin_memory=False,
    )
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # start the workers
    start, seen = time.perf_counter(), 0
    for b in it:
        seen += b["moments"].shape[0]
    return seen / (time.perf_counter() - start)


def sd_vae_architecture(path: Path) -> Path:
    """An AutoencoderKL with the architecture of stabilityai/sd-vae-ft-ema (83.7M parameters), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = ("DownEncoderBlock2D",) * 4
    AutoencoderKL(
        down_block_types=blocks,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    ).save_pretrained(path)
    return path


def bench_extraction(tmp: Path, resolution: int, make_vae, factor: int, count: int) -> float:
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from latentdiff.config import register_resolvers
    from latentdiff.extract import run_extraction

    register_resolvers()
    vae_dir = make_vae(tmp / f"vae_{resolution}")
    folder = tmp / f"images_{resolution}" / "n00000001"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    side = int(resolution * 1.5)
    for i in range(count):  # JPEGs larger than the crop, like ImageNet's ~400x350
        Image.fromarray(rng.integers(0, 256, (side, int(side * 1.3), 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    overrides = [
        f"data.root={folder.parent}",
        f"resolution={resolution}",
        "vae=local",
        f"vae.pretrained={vae_dir}",
        f"vae.downsample_factor={factor}",
        f"out={tmp / f'store_{resolution}'}",
        "num_workers=2",
        "batch_size=8",
        "shard_size=4096",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=overrides)
    return run_extraction(cfg)["extraction"]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16384, help="items of the synthetic store")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sd-images", type=int, default=4, help="images encoded with the SD-VAE architecture")
    parser.add_argument("--out", default=str(ROOT / "outputs/bench/loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = synthetic_store(tmp / "store", args.items)
        for in_memory in (False, True):
            for workers in (0, 2):
                rate = bench_loader(store, args.batch, workers, in_memory)
                rows.append(
                    {
                        "what": f"loader {'RAM' if in_memory else 'memory-mapped'}, {workers} workers",
                        "unit": "samples/s",
                        "value": rate,
                    }
                )
        rows.append(
            {
                "what": "extraction, SD-VAE architecture, 256 px (+ flip)",
                "unit": "images/s",
                "value": bench_extraction(tmp, 256, sd_vae_architecture, 8, args.sd_images),
            }
        )
        rows.append(
            {
                "what": "extraction, tiny VAE, 32 px (+ flip): pipeline overhead",
                "unit": "images/s",
                "value": bench_extraction(tmp, 32, make_tiny_vae, TINY_VAE_FACTOR, 512),
            }
        )
    size = 2 * 8 * 32 * 32 * 2 + 8  # moments of image + flip in fp16, and the label
    print(
        f"\nlatent data on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, {args.items} items of 32x32x4 latents ({size / 1024:.1f} KiB each in the store)"
    )
    print(f"{'measure':<58} {'value':>10}  unit")
    for row in rows:
        print(f"{row['what']:<58} {row['value']:>10.1f}  {row['unit']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "items": args.items,
                "bytes_per_item": size,
                "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
