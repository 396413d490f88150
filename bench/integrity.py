"""What the checksums cost: a large checkpoint (CRC-32 per zip record) and a latent store of a few GB (SHA-256
per shard file).

    python bench/integrity.py [--params 286763172] [--store-gb 3] [--out outputs/bench/integrity.json]

Checkpoint: a payload the size of a U-ViT-L/2 training checkpoint (weights, EMA, AdamW's two moments: 4 x the
parameters in fp32) written with `save_checkpoint`, read back with `torch.load` (what a resume does), and
verified with `verify_checkpoint` (what every load now adds). Store: `write_shard` (which hashes while it
writes) against a plain `np.save` of the same arrays, then `verify_store`. Reads are timed warm (just written,
in the page cache: the CPU cost of the check) and, when this process may drop the page cache (root on
Linux), cold (from the disk: what a resume on a fresh node pays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint(folder: Path, params: int) -> dict:
    from latentdiff.checkpoint import save_checkpoint, verify_checkpoint

    chunk = 16 * 2**20  # parameters per tensor (64 MB)
    sizes = [chunk] * (params // chunk) + ([params % chunk] if params % chunk else [])
    payload = {
        group: {f"{group}.{i}": torch.rand(n) for i, n in enumerate(sizes)}
        for group in ("backbone", "ema", "exp_avg", "exp_avg_sq")
    }
    path = folder / "large.ckpt"
    start = time.perf_counter()
    save_checkpoint(payload, path)
    out = {"params": params, "write_s": time.perf_counter() - start, "bytes": path.stat().st_size}
    payload.clear()
    out["load_warm_s"] = _timed(lambda: torch.load(path, map_location="cpu", weights_only=True))
    out["verify_warm_s"] = _timed(lambda: verify_checkpoint(path))
    if _drop_caches():
        out["verify_cold_s"] = _timed(lambda: verify_checkpoint(path))  # leaves the file in the cache
        _drop_caches()
        out["load_cold_s"] = _timed(lambda: torch.load(path, map_location="cpu", weights_only=True))
    path.unlink()
    return out


def store(folder: Path, gigabytes: float) -> dict:
    from latentdiff.data.store import verify_store, write_shard
    from latentdiff.files import write_json

    item = (2, 8, 32, 32)  # ImageNet-256 SD-VAE moments and the flip: 32 KiB per item, fp16
    shard_size = 4096
    shards = max(1, round(gigabytes * 1e9 / (shard_size * 2 * np.prod(item))))
    rng = np.random.default_rng(0)
    arrays = {
        "moments": rng.standard_normal((shard_size, *item), dtype=np.float32).astype(np.float16),
        "labels": rng.integers(0, 1000, shard_size),
    }
    root = folder / "store"
    plain = folder / "plain"
    plain.mkdir()
    write_s = sum(_timed(lambda k=k: write_shard(root, k, dict(arrays), {"count": shard_size})) for k in range(shards))

    def plain_save(k: int) -> None:
        for key, value in arrays.items():
            with open(plain / f"{key}-{k}.npy", "wb") as f:
                np.save(f, value)
                f.flush()
                os.fsync(f.fileno())

    plain_s = sum(_timed(lambda k=k: plain_save(k)) for k in range(shards))
    meta = {
        "format": "latentdiff-latents",
        "version": 1,
        "count": shards * shard_size,
        "num_shards": shards,
        "resolution": 256,
        "latent_shape": [4, 32, 32],
        "views": 2,
        "num_classes": 1000,
        "vae": {"kind": "AutoencoderKL"},
    }
    write_json(root / "store.json", meta)
    out = {"shards": shards, "write_hashed_s": write_s, "write_plain_s": plain_s}
    result = verify_store(root)
    out.update(bytes=result["bytes"], verify_warm_s=result["seconds"])
    if _drop_caches():
        out["verify_cold_s"] = verify_store(root)["seconds"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=286_763_172, help="U-ViT-L/2 (README table)")
    parser.add_argument("--store-gb", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="where the files are written (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "outputs/bench/integrity.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "checkpoint": checkpoint(Path(tmp), args.params),
            "store": store(Path(tmp), args.store_gb),
        }
    c, s = result["checkpoint"], result["store"]

    def gb(n: float) -> float:
        return n / 1e9

    print(f"checkpoint {gb(c['bytes']):.2f} GB ({c['params'] / 1e6:.0f}M params x 4 tensors):")
    print(
        f"  write {c['write_s']:.1f} s, torch.load (warm) {c['load_warm_s']:.1f} s, "
        f"verify (warm) {c['verify_warm_s']:.1f} s = {gb(c['bytes']) / c['verify_warm_s']:.2f} GB/s"
    )
    if "verify_cold_s" in c:
        print(f"  cold: torch.load {c['load_cold_s']:.1f} s, verify {c['verify_cold_s']:.1f} s")
    print(f"store {gb(s['bytes']):.2f} GB ({s['shards']} shards of 4096 ImageNet-256 latents):")
    print(
        f"  write with SHA-256 {s['write_hashed_s']:.1f} s vs plain np.save {s['write_plain_s']:.1f} s; "
        f"verify (warm) {s['verify_warm_s']:.1f} s = {gb(s['bytes']) / s['verify_warm_s']:.2f} GB/s"
    )
    if "verify_cold_s" in s:
        print(f"  verify (cold) {s['verify_cold_s']:.1f} s = {gb(s['bytes']) / s['verify_cold_s']:.2f} GB/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
