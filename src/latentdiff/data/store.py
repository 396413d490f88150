"""The latent store: VAE moments or VQ token ids (and text features) in shards of contiguous `.npy` arrays.

Layout of a store folder (written by `latentdiff.extract`, read by `LatentDataModule`):

    plan.json                  what is being extracted (written first; a resumed run must match it)
    store.json                 metadata of the complete store (written last: its presence means complete)
    empty_text.npy             (L, D) fp16 features of the empty prompt (text stores only, for CFG)
    shards/shard-00000/
        moments.npy            (n, F, 2C, h, w) fp16: posterior mean ++ log-variance; F = 2: image, h-flip
        tokens.npy             (n, F, h, w) uint16: VQ codebook ids instead of moments (a `VQModel` store;
                               store.json's `tokens` holds the codebook size and the downsampling)
        labels.npy             (n,) int64 class ids (class-conditional stores)
        text.npy               (m, L, D) fp16: features of every caption of the shard's images (with a
                               pooled text encoder, row L - 1 is the pooled embedding: see `latentdiff.text`)
        text_offsets.npy       (n + 1,) int64: captions of image i are text[offsets[i]:offsets[i + 1]]
        captions.json          the caption strings, per image (text stores)
        index.json             count, source indices, skipped files, array shapes (checked on load)

Why `.npy` and not one file per image (official U-ViT, fast-DiT) or safetensors: `np.load(mmap_mode="r")`
maps a shard without reading it, a batch is one fancy-indexing copy out of the page cache, and the header
gives the shape to check a truncated file against; safetensors maps too but slices tensor by tensor.
A shard folder is written under a temporary name and renamed when every file is on disk, so a crash never
leaves a shard that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentdiff.errors import StoreError

FORMAT = "latentdiff-latents"
VERSION = 1
_ARRAYS = ("moments", "tokens", "labels", "text", "text_offsets")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(root: Path, index: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> Path:
    """Write one shard folder atomically: into `.tmp-shard-XXXXX-<pid>/`, then rename.

    Args:
        root: the store folder.
        index: shard number.
        arrays: `moments` or `tokens`, and optionally `labels`, `text`, `text_offsets` (see the module docstring).
        info: extra JSON facts (count, source indices, skipped files, captions).
    """
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    final = shards / shard_name(index)
    tmp = shards / f".tmp-{shard_name(index)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shapes, digests = {}, {}
    for key, value in arrays.items():
        with open(tmp / f"{key}.npy", "wb") as f:
            hashing = _HashingWriter(f)
            np.save(hashing, np.ascontiguousarray(value))
            f.flush()
            os.fsync(f.fileno())
        shapes[key] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        digests[f"{key}.npy"] = hashing.hexdigest()
    captions = info.pop("captions", None)
    if captions is not None:
        with open(tmp / "captions.json", "wb") as f:
            hashing = _HashingWriter(f)
            hashing.write(json.dumps(captions).encode())
        digests["captions.json"] = hashing.hexdigest()
    with open(tmp / "index.json", "w") as f:
        json.dump({**info, "arrays": shapes, "sha256": digests}, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # an invalid leftover (checked by the caller): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


class _HashingWriter:
    """A binary file that also computes the SHA-256 of what is written to it (`np.save` writes through it)."""

    def __init__(self, f: Any):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 26) -> str:
    """SHA-256 of a file, hashed from a memory map (no copies: about 1.3 GB/s on one core here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for offset in range(0, len(m), chunk):
                    digest.update(view[offset : offset + chunk])
            finally:
                view.release()
    return digest.hexdigest()


def check_shard(path: Path, verify: bool = False) -> dict[str, Any]:
    """Read a shard's index and check that each array file holds the shape it declares.

    Args:
        path: the shard folder.
        verify: also recompute the SHA-256 of every file the index records one for (reads the whole shard).

    Returns:
        The shard's index.json.

    Raises:
        StoreError: a missing or truncated file, an array whose header disagrees with the index, or (verify) a
            file whose content changed since it was written.
    """
    try:
        info = json.loads((path / "index.json").read_text())
        if not isinstance(info, dict) or not isinstance(info.get("count"), int):
            raise ValueError("no count")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable index.json ({err.__class__.__name__})") from None
    for key, spec in info.get("arrays", {}).items():
        file = path / f"{key}.npy"
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise StoreError(f"{file} is truncated or unreadable ({str(err).splitlines()[0]})") from None
        if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
            raise StoreError(f"{file} holds {array.dtype}{list(array.shape)}, its index says {spec}")
    if verify:
        for name, expected in (info.get("sha256") or {}).items():
            file = path / str(name)
            try:
                digest = sha256_file(file) if Path(str(name)).name == name and file.is_file() else None
            except OSError:
                digest = None
            if digest is None:
                raise StoreError(f"{file} is missing or unreadable (the shard's index records it)")
            if digest != expected:
                raise StoreError(
                    f"{path / name} is corrupt: its SHA-256 differs from the one recorded when it was written"
                )
    return info


def check_store_records(root: Path, meta: dict[str, Any]) -> None:
    """Compare store.json's checksums of each shard's index.json and of empty_text.npy with the files.

    Raises:
        StoreError: naming the file that changed.
    """
    for name, expected in (meta.get("sha256") or {}).items():
        path = root / ("shards" if name.startswith("shard-") else "") / name
        file = path / "index.json" if name.startswith("shard-") else path
        try:
            same = file.is_file() and sha256_file(file) == expected
        except OSError:
            same = False
        if not same:
            raise StoreError(f"{file} is corrupt: its SHA-256 differs from the one store.json recorded")


def verify_store(root: Path, progress: Any = None) -> dict[str, Any]:
    """Recompute every checksum of a complete store (`check_store_records`, then each shard's files).

    Args:
        root: the store folder.
        progress: called with (shard number, number of shards) after each shard.

    Returns:
        {"shards": count, "bytes": bytes hashed, "seconds": time taken, "unrecorded": shards without checksums}.

    Raises:
        StoreError: the first damaged file, named.
    """
    import time

    start, size, unrecorded = time.perf_counter(), 0, 0
    meta = read_store_meta(root)
    check_store_records(root, meta)
    for i in range(meta["num_shards"]):
        path = root / "shards" / shard_name(i)
        info = check_shard(path, verify=True)
        unrecorded += not info.get("sha256")
        size += sum((path / name).stat().st_size for name in (info.get("sha256") or {}))
        if progress is not None:
            progress(i + 1, meta["num_shards"])
    seconds = time.perf_counter() - start
    return {"shards": meta["num_shards"], "bytes": size, "seconds": seconds, "unrecorded": unrecorded}


# store.json fields a reader relies on, and the type each must have
_META_TYPES: dict[str, Any] = {
    "count": int,
    "num_shards": int,
    "resolution": int,
    "latent_shape": list,
    "views": int,
    "num_classes": int,
    "vae": dict,
    "text": (dict, type(None)),
    "tokens": (dict, type(None)),
}


def read_store_meta(root: Path, key: str = "data.root") -> dict[str, Any]:
    """A complete store's store.json, checked field by field (a hand-edited or damaged file is one line).

    Raises:
        StoreError: unreadable, not a latentdiff store, or a field of the wrong type or range.
    """
    try:
        meta = json.loads((root / "store.json").read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{key}={root}: store.json is unreadable ({err.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{key}={root}: store.json is not a {FORMAT} store")
    for field, kind in _META_TYPES.items():
        value = meta.get(field)
        if field in ("text", "tokens") and field not in meta:
            continue
        bad = not isinstance(value, kind) or isinstance(value, bool)
        if not bad and kind is int:
            bad = value < (1 if field in ("resolution", "views") else 0)
        if not bad and field == "latent_shape":
            bad = len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        if bad:
            raise StoreError(
                f"{key}={root}: store.json holds {field}={json.dumps(value)[:60]}, which is not a valid {field}; "
                "the file was edited or damaged: extract the store again"
            )
    return meta


@dataclass
class Shard:
    """One shard's arrays (memory-mapped or in RAM)."""

    moments: np.ndarray | None  # (n, F, 2C, h, w) fp16 (VAE stores)
    tokens: np.ndarray | None  # (n, F, h, w) uint16 (VQ stores)
    labels: np.ndarray | None  # (n,) int64
    text: np.ndarray | None  # (m, L, D) fp16
    text_offsets: np.ndarray | None  # (n + 1,) int64
    count: int


class LatentStore:
    """A complete latent store opened for reading: metadata, shards and a global index.

    Args:
        root: the store folder (holding store.json).
        in_memory: read every shard into RAM instead of memory-mapping it.
        key: the config key named in errors (e.g. "data.root").
    """

    def __init__(self, root: str | Path, in_memory: bool = False, key: str = "data.root"):
        self.root, self.in_memory = Path(root), bool(in_memory)
        if not self.root.is_dir():
            raise StoreError(f"{key}={root} does not exist; extract a store with `python -m latentdiff.extract`")
        meta_file = self.root / "store.json"
        if not meta_file.is_file():
            detail = "an extraction is incomplete there; resume it" if (self.root / "plan.json").exists() else ""
            raise StoreError(
                f"{key}={root} is not a complete latent store (no store.json)"
                + (f": {detail}" if detail else "; extract one with `python -m latentdiff.extract`")
            )
        self.meta = read_store_meta(self.root, key)
        self.shards: list[Shard] = []
        for i in range(self.meta["num_shards"]):
            path = self.root / "shards" / shard_name(i)
            if not path.is_dir():
                raise StoreError(f"{key}={root}: shard {shard_name(i)} is missing; re-run the extraction to repair it")
            try:
                info = check_shard(path)
            except StoreError as err:
                raise StoreError(f"{key}={root}: {err}; re-run the extraction to repair the store") from None
            self.shards.append(_open_shard(path, info["count"], in_memory))
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # global index -> shard by searchsorted
        if int(self.offsets[-1]) != self.meta["count"]:
            raise StoreError(
                f"{key}={root}: shards hold {int(self.offsets[-1])} items, store.json says {self.meta['count']}"
            )
        self.empty_text = None
        if self.meta.get("text"):
            self.empty_text = np.load(self.root / "empty_text.npy")  # (L, D) fp16

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def holds_tokens(self) -> bool:
        """A store of VQ token ids (`tokens.npy`), not of VAE moments."""
        return bool(self.meta.get("tokens"))

    def __getstate__(self) -> dict[str, Any]:
        # loader workers started by spawn/forkserver get the dataset pickled: a memory map would be pickled
        # as a full copy of the data, so send the file names and map them again in the worker
        state = dict(self.__dict__)
        if not self.in_memory:
            state["shards"] = [Shard(None, None, None, None, None, s.count) for s in self.shards]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if not self.in_memory:
            self.shards = [
                _open_shard(self.root / "shards" / shard_name(i), s.count, False) for i, s in enumerate(self.shards)
            ]

    def captions(self, index: int) -> list[str]:
        """All captions of item `index` (text stores)."""
        shard, local = self.locate(np.asarray([index]))
        return self.shard_captions(int(shard[0]))[int(local[0])]

    def shard_captions(self, shard: int) -> list[list[str]]:
        """The captions of every item of one shard (text stores)."""
        return json.loads((self.root / "shards" / shard_name(shard) / "captions.json").read_text())

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global item indices -> (shard numbers, indices within the shard)."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return shard, indices - self.offsets[shard]


def _open_shard(path: Path, count: int, in_memory: bool) -> Shard:
    """A shard's arrays, memory-mapped (or read into RAM); absent arrays are None."""
    files = {k: path / f"{k}.npy" for k in _ARRAYS}
    arrays = {
        k: (np.load(f) if in_memory else np.load(f, mmap_mode="r")) if f.exists() else None for k, f in files.items()
    }
    return Shard(count=count, **arrays)
