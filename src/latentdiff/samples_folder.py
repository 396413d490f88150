"""A samples folder (`sample.py`'s `out`): what is in it, what made it, and the samples.npz assembled from it.

samples.json          provenance: checkpoint, weights (EMA or raw), model, VAE, objective, sampler, steps,
                      guidance, seed, labels/prompts, library versions; `complete` once samples.npz is written
parts/                what each process made, batch by batch: r<rank>-<first index>.npy (uint8 NHWC) and
                      .json (indices, labels or captions); a re-run skips the indices found here
images/000123.png     one PNG per index (save_png=true)
samples.npz           arr_0 (N, H, W, 3) uint8 and, class-conditional, arr_1 (N,) int64 class ids: the layout
                      of ADM's evaluator and DiT's sample_ddp.py; written by the last process to finish
captions.txt          text models: the caption of each index, one per line
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdiff.errors import ConfigError, shorten
from latentdiff.files import replacing, save_array, write_json
from latentdiff.renames import canonical_target

# keys of samples.json that may differ when a folder is resumed or extended
NOT_IDENTITY = ("num_samples", "batch_size", "versions", "complete")


def check_out(out: Path, spec: dict[str, Any]) -> None:
    """Refuse a folder holding other samples (naming each differing key with both values), or anything else."""
    meta = out / "samples.json"
    if meta.is_file():
        old, new = _flat(json.loads(meta.read_text())), _flat(spec)
        keys = sorted(
            k for k in set(old) | set(new) if k.split(".")[0] not in NOT_IDENTITY and old.get(k) != new.get(k)
        )
        if keys:
            shown = [f"{k}: {shorten(old.get(k), 40)} there, {shorten(new.get(k), 40)} now" for k in keys[:4]]
            more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
            raise ConfigError(
                f"out={out} holds samples made differently: {'; '.join(shown)}{more}; choose another out= "
                "or sample with the same settings"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} is not empty and holds no samples.json; choose another out=")


def _flat(record: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON record as {dotted key: leaf value} (lists are leaves)."""
    if not isinstance(record, dict):
        return {prefix: record}
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "_target_" and isinstance(value, str):
            value = canonical_target(value)  # a folder written before a class moved holds its old name
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def done_indices(out: Path) -> set[int]:
    """Sample indices already written to `out/parts` by any process of any earlier run."""
    done: set[int] = set()
    for meta in (out / "parts").glob("r*.json"):
        if meta.with_suffix(".npy").is_file():
            done.update(json.loads(meta.read_text())["indices"])
    return done


def write_part(out: Path, rank: int, indices: list[int], images: np.ndarray, conds: list[Any]) -> None:
    parts = out / "parts"
    name = f"r{rank:03d}-{indices[0]:08d}"
    save_array(parts / f"{name}.npy", images)
    write_json(parts / f"{name}.json", {"indices": indices, "conds": conds})  # last: marks the part done


def write_pngs(out: Path, indices: list[int], images: np.ndarray) -> None:
    import torchvision

    folder = out / "images"
    for i, image in zip(indices, images):
        png = torchvision.io.encode_png(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        with replacing(folder / f"{i:06d}.png") as f:
            f.write(png.numpy().tobytes())


def assemble(out: Path, num_samples: int, class_conditional: bool) -> Path | None:
    """Write samples.npz (indices 0..N-1 in order) from the parts; None while some index is missing.

    The npz is streamed part by part into a zip (no copy of all images in memory); it is written under a
    temporary name and renamed, so a samples.npz is always complete.
    """
    where: dict[int, tuple[Path, int]] = {}
    conds: dict[int, Any] = {}
    for meta_file in sorted((out / "parts").glob("r*.json")):
        meta = json.loads(meta_file.read_text())
        for row, (i, c) in enumerate(zip(meta["indices"], meta["conds"])):
            if i < num_samples:
                where[i], conds[i] = (meta_file.with_suffix(".npy"), row), c
    if len(where) < num_samples:
        return None
    first = np.load(where[0][0], mmap_mode="r")
    shape = (num_samples, *first.shape[1:])
    path = out / "samples.npz"
    maps: dict[Path, np.ndarray] = {}
    with replacing(path) as npz, zipfile.ZipFile(npz, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for start in range(0, num_samples, 256):
                chunk = []
                for i in range(start, min(start + 256, num_samples)):
                    file, row = where[i]
                    if file not in maps:
                        maps[file] = np.load(file, mmap_mode="r")
                    chunk.append(maps[file][row])
                f.write(np.ascontiguousarray(np.stack(chunk)).tobytes())
        if class_conditional:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray([conds[i] for i in range(num_samples)], dtype=np.int64))
    if not class_conditional and any(isinstance(conds[i], str) for i in range(num_samples)):
        (out / "captions.txt").write_text("".join(str(conds[i]).replace("\n", " ") + "\n" for i in range(num_samples)))
    return path
