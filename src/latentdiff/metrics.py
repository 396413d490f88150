"""FID, IS, KID and precision/recall on torch-fidelity's Inception-v3 (the TF-FID port), fed by uint8 batches.

torch-fidelity computes the metrics; this module adds what it lacks for diffusion papers:
- images streamed from an ADM-layout `.npz` (`arr_0`, uint8 NHWC) without loading or re-decoding them all;
- references given as statistics (`mu`, `sigma`, e.g. ADM's VIRTUAL_imagenet256_labeled.npz), which
  torch-fidelity cannot take: FID is computed from them with torch-fidelity's own formula, dtypes cast to float64;
- reference features and statistics cached on disk with their provenance (file, Inception weights hash).

The Inception network and its weights file live in `inception.py`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from latentdiff.files import replacing, write_json
from latentdiff.inception import FID_LAYER, ISC_LAYER, Inception

METRICS = ("fid", "isc", "kid", "prc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------- inputs
class NpzImages:
    """uint8 NHWC images of an `.npz` (`arr_0`) read in chunks, stored or compressed, never all at once.

    Args:
        path: the npz file.
        key: the option naming it, for errors.
    """

    def __init__(self, path: str | Path, key: str = "samples"):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"{key}={path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.members = [n.removesuffix(".npy") for n in zf.namelist()]
                if "arr_0" not in self.members:
                    self.shape, self.dtype = None, None
                    return
                with zf.open("arr_0.npy") as f:
                    self.shape, self.dtype = _npy_header(f)
        except zipfile.BadZipFile:
            raise ValueError(f"{key}={path} is not an .npz file") from None

    @property
    def has_images(self) -> bool:
        return self.shape is not None

    def check(self) -> None:
        """Raise one line unless arr_0 holds uint8 images (N, H, W, 3)."""
        if not self.has_images:
            raise ValueError(f"{self.key}={self.path} has no arr_0 (images); it holds {', '.join(self.members)}")
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
            raise ValueError(
                f"{self.key}={self.path}: arr_0 is {self.dtype} {list(self.shape)}; expected uint8 images "
                "(N, H, W, 3) in [0, 255] (ADM layout)"
            )

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.shape[1]), int(self.shape[2])

    def batches(self, limit: int | None = None, chunk: int = 256) -> Iterator[np.ndarray]:
        count = len(self) if limit is None else min(limit, len(self))
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _npy_header(f)
            for start in range(0, count, chunk):
                n = min(chunk, count - start)
                data = f.read(n * row)
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])

    def array(self, name: str) -> np.ndarray:
        with np.load(self.path) as npz:
            return npz[name]


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not supported")
    return shape, dtype


class FolderImages:
    """The image files of a folder (sorted by name, recursively), decoded to uint8 NHWC RGB."""

    def __init__(self, path: str | Path, key: str = "samples"):
        self.path, self.key = Path(path), key
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{key}={path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        first = self._read(self.files[0])
        self.image_shape = (first.shape[0], first.shape[1])

    def check(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, file: Path) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(str(file), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()  # (H, W, 3)

    def batches(self, limit: int | None = None, chunk: int = 256) -> Iterator[np.ndarray]:
        files = self.files[:limit] if limit is not None else self.files
        for start in range(0, len(files), chunk):
            images = [self._read(f) for f in files[start : start + chunk]]
            shapes = {im.shape for im in images}
            if len(shapes) > 1 or images[0].shape[:2] != self.image_shape:
                raise ValueError(f"{self.key}={self.path}: images of different sizes ({sorted(shapes)})")
            yield np.stack(images)


def open_images(path: str | Path, key: str) -> NpzImages | FolderImages:
    """An image set: an `.npz` with arr_0, or a folder of image files."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path, key)
    if not path.exists():
        raise FileNotFoundError(f"{key}={path} does not exist")
    return NpzImages(path, key)


# ------------------------------------------------------------------------------------- reference
class Reference:
    """What the samples are compared with: statistics (mu, sigma) and/or Inception features of images.

    Built by `load_reference`: an npz with `mu`/`sigma` (ADM reference batches; their arr_0, when present,
    gives the features for KID and precision/recall), an npz of images, or an image folder. Features of
    images are computed once and cached in `cache_dir` (keyed by the file's size, mtime and the weights hash).
    """

    def __init__(self, source: str, mu=None, sigma=None, features=None, image_shape=None, provenance=None):
        self.source, self.mu, self.sigma, self.features = source, mu, sigma, features
        self.image_shape, self.provenance = image_shape, dict(provenance or {})


def check_reference(path: str | Path) -> tuple[NpzImages | FolderImages, tuple[np.ndarray, np.ndarray] | None]:
    """Open a reference and read its statistics if it has them (no Inception needed): (images, (mu, sigma) or None).

    Raises:
        ValueError: missing, not images nor statistics, statistics of the wrong shapes or not finite.
    """
    key, path = "reference", Path(path)
    images = open_images(path, key)
    if not isinstance(images, NpzImages):
        return images, None
    if "mu" not in images.members and "sigma" not in images.members:
        if not images.has_images:
            raise ValueError(
                f"{key}={path} holds neither images (arr_0) nor statistics (mu, sigma); "
                f"it holds {', '.join(images.members)}"
            )
        return images, None
    if not {"mu", "sigma"} <= set(images.members):
        raise ValueError(f"{key}={path} holds mu or sigma but not both; a statistics file needs mu and sigma")
    stats = (images.array("mu"), images.array("sigma"))
    if stats[0].ndim != 1 or stats[1].shape != (len(stats[0]), len(stats[0])):
        raise ValueError(
            f"{key}={path}: mu {list(stats[0].shape)} and sigma {list(stats[1].shape)} are not (D,) and (D, D)"
        )
    for name, array in zip(("mu", "sigma"), stats):
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ValueError(
                f"{key}={path}: {name} holds NaN, inf or non-numbers; FID needs finite statistics "
                "(recompute them with evaluate.py write_stats=<npz>)"
            )
    return images, stats


def load_reference(
    path: str | Path, inception: Inception, cache_dir: str | Path | None, need_features: bool
) -> Reference:
    """Open a reference (see `Reference`); `need_features` for KID / precision-recall."""
    key, path = "reference", Path(path)
    images, stats = check_reference(path)
    provenance = {"reference": str(path.resolve())}
    if stats is not None and not (need_features and getattr(images, "has_images", False)):
        if need_features:
            raise ValueError(f"{key}={path} holds only statistics (mu, sigma); kid and prc need reference images")
        image_shape = images.image_shape if images.has_images else None
        return Reference(
            str(path), stats[0], stats[1], None, image_shape, {**provenance, "statistics": "mu/sigma of the file"}
        )
    images.check()
    features, cache_file = _cached_features(path, images, inception, cache_dir)
    provenance.update(count=len(images), cache=str(cache_file) if cache_file else None)
    mu, sigma = stats if stats is not None else (None, None)
    if stats is not None:
        provenance["statistics"] = "mu/sigma of the file"
    return Reference(str(path), mu, sigma, features, images.image_shape, provenance)


def _cached_features(
    path: Path, images, inception: Inception, cache_dir
) -> tuple[dict[str, torch.Tensor], Path | None]:
    stat = path.stat() if path.is_file() else None
    ident = {
        "path": str(path.resolve()),
        "size": stat.st_size if stat else len(images),
        "mtime": stat.st_mtime if stat else max(f.stat().st_mtime for f in images.files),
        "inception_sha256": inception.describe()["sha256"],
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir).expanduser() / f"{path.stem}-{digest}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as npz:
            return {
                FID_LAYER: torch.from_numpy(npz[FID_LAYER]),
                ISC_LAYER: torch.from_numpy(npz[ISC_LAYER]),
            }, cache_file
    features = inception.features(images.batches(), total=len(images))
    if cache_file is not None:
        stats = fid_features_to_statistics(features[FID_LAYER])
        write_json(cache_file.with_suffix(".json"), {**ident, "count": len(images)})
        with replacing(cache_file) as f:  # last: a cache file is always complete and described
            np.savez(f, mu=stats["mu"], sigma=stats["sigma"], **{k: v.numpy() for k, v in features.items()})
    return features, cache_file


def write_statistics(path: str | Path, features: torch.Tensor) -> None:
    """Write an ADM-style statistics npz (mu (D,), sigma (D, D), float64) of 2048-d Inception features."""
    stats = fid_features_to_statistics(features)
    np.savez(path, mu=stats["mu"].astype(np.float64), sigma=stats["sigma"].astype(np.float64))


# ---------------------------------------------------------------------------------------- metrics
def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """torch-fidelity's FID formula on two sets of statistics, both cast to float64."""
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(
            f"reference statistics have {s2['mu'].shape[0]} dimensions; Inception pool3 has {s1['mu'].shape[0]}"
        )
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def compute_metrics(
    features: dict[str, torch.Tensor], reference: Reference | None, metrics: list[str], options: dict[str, Any]
) -> dict[str, float]:
    """The requested metrics from sample features and a reference, with torch-fidelity's functions.

    `options` are torch-fidelity keyword arguments (isc_splits, kid_subsets, kid_subset_size,
    prc_neighborhood, rng_seed, samples_shuffle, ...); their defaults are torch-fidelity's.
    """
    kwargs = {"verbose": False, **options}
    out: dict[str, float] = {}
    if "isc" in metrics:
        from torch_fidelity.helpers import get_kwarg

        isc = isc_features_to_metric(
            features[ISC_LAYER],
            get_kwarg("isc_splits", kwargs),
            get_kwarg("samples_shuffle", kwargs),
            get_kwarg("rng_seed", kwargs),
        )
        out["isc_mean"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "fid" in metrics:
        if reference.features is not None and reference.mu is None:
            s1 = fid_features_to_statistics(features[FID_LAYER])
            s2 = fid_features_to_statistics(reference.features[FID_LAYER])
            out["fid"] = float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])
        else:
            s1 = fid_features_to_statistics(features[FID_LAYER])
            out["fid"] = fid_from_statistics(s1["mu"], s1["sigma"], reference.mu, reference.sigma)
    if "kid" in metrics:
        kid = kid_features_to_metric(features[FID_LAYER], reference.features[FID_LAYER], **kwargs)
        out["kid_mean"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    if "prc" in metrics:
        prc = prc_features_to_metric(features[FID_LAYER], reference.features[FID_LAYER], **kwargs)
        out["precision"], out["recall"], out["f_score"] = prc["precision"], prc["recall"], prc["f_score"]
    return out
