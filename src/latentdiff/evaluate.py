"""`run_evaluation(cfg)`: `evaluate.py`'s work. Inception features of the samples, metrics against a reference,
one JSON line on stdout and metrics.json with the provenance of every value."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentdiff.distributed import device_for
from latentdiff.errors import ConfigError, user_errors
from latentdiff.files import write_json
from latentdiff.inception import Inception
from latentdiff.metrics import (
    METRICS,
    check_reference,
    compute_metrics,
    load_reference,
    open_images,
    write_statistics,
)
from latentdiff.utils import framework_versions
from latentdiff.validation import check_config

log = logging.getLogger(__name__)

_SAMPLE_PROVENANCE = ("checkpoint", "global_step", "weights", "sampler", "seed", "labels", "prompts", "precision")


# Inception's metrics (torch-fidelity), and `shapes`: the built-in data's judge (shape accuracy, FD-shapes)
ALL_METRICS = (*METRICS, "shapes")


def _validate(cfg: DictConfig) -> list[str]:
    check_config(cfg, "evaluate", groups=False)
    metrics = list(cfg.metrics) if cfg.metrics is not None else []
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"metrics={metrics}: {unknown[0]} is not a metric; use any of {', '.join(ALL_METRICS)}")
    if not metrics and not cfg.get("write_stats"):
        raise ConfigError(f"metrics=[] and no write_stats: nothing to do; use any of {', '.join(ALL_METRICS)}")
    if cfg.get("reference") is None and any(m in metrics for m in ("fid", "kid", "prc")):
        raise ConfigError(f"metrics={metrics} need reference=<statistics npz, images npz or folder>")
    for key in ("out", "write_stats"):
        if cfg.get(key) and Path(cfg[key]).is_dir():
            raise ConfigError(f"{key}={cfg[key]} is a folder; {key} takes a file path")
    return metrics


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Score `cfg.samples` against `cfg.reference` (see conf/evaluate.yaml); `metrics=[shapes]` needs neither a
    reference nor Inception weights (`latentdiff.judge`).

    Returns:
        The metrics.json record: {"metrics": {...}, "provenance": {...}}.
    """
    with user_errors():
        metrics = _validate(cfg)
        samples = open_images(cfg.samples, "samples")
        samples.check()
        available = len(samples)
        n = int(cfg.num_samples) if cfg.get("num_samples") is not None else available
        if available < n:
            raise ConfigError(f"samples={cfg.samples} holds {available} images, fewer than num_samples={n}")
        options = OmegaConf.to_container(cfg.fidelity) if cfg.get("fidelity") else {}
        subset = int(options.get("kid_subset_size", 1000))
        if "kid" in metrics and n < subset:
            raise ConfigError(f"fidelity.kid_subset_size={subset} is more than the {n} samples; set it to <= {n}")
        labels = _shape_labels(samples, n, cfg.samples) if "shapes" in metrics else None
        if cfg.get("reference") is not None:
            check_reference(cfg.reference)  # a wrong path or bad statistics fail before the Inception weights load
        inception, reference = None, None
        if any(m in METRICS for m in metrics) or cfg.get("write_stats"):
            inception = Inception(cfg.get("inception_weights"), device_for(str(cfg.device)), int(cfg.batch_size))
        if cfg.get("reference") is not None and inception is not None:
            need_features = any(m in metrics for m in ("kid", "prc"))
            reference = load_reference(cfg.reference, inception, cfg.get("cache_dir"), need_features)
            if reference.image_shape is not None and tuple(reference.image_shape) != tuple(samples.image_shape):
                raise ConfigError(
                    f"samples={cfg.samples} are {samples.image_shape[0]}x{samples.image_shape[1]} but "
                    f"reference={cfg.reference} is {reference.image_shape[0]}x{reference.image_shape[1]}; "
                    "compare images of the same resolution"
                )
            if "kid" in metrics and len(reference.features["2048"]) < subset:
                raise ConfigError(
                    f"fidelity.kid_subset_size={subset} is more than the reference's "
                    f"{len(reference.features['2048'])} images; set it lower"
                )
    values, seconds = {}, None
    if inception is not None:
        start = time.perf_counter()
        features = inception.features(samples.batches(limit=n), total=n)
        seconds = time.perf_counter() - start
        if cfg.get("write_stats"):
            write_statistics(cfg.write_stats, features["2048"])
            log.info("wrote the statistics of %d samples to %s", n, cfg.write_stats)
        values = compute_metrics(features, reference, [m for m in metrics if m in METRICS], options)
    judge = None
    if labels is not None:
        from latentdiff.judge import JUDGE_SEED, cache_file, judge_samples

        with user_errors():  # too few samples, or ids that do not match them: one line
            if n < 2 or len(labels) != n:
                raise ConfigError(
                    f"metrics=[shapes] needs at least 2 samples, each with a class id in arr_1 of "
                    f"samples={cfg.samples}; got {n} images and {len(labels)} ids"
                )
            values.update(judge_samples(np.concatenate(list(samples.batches(limit=n))), labels))
        judge = {"seed": JUDGE_SEED, "weights": str(cache_file(samples.image_shape[0], JUDGE_SEED))}
    values = {k: v if math.isfinite(v) else None for k, v in values.items()}  # strict JSON: no NaN
    record = {"metrics": values, "provenance": _provenance(cfg, n, inception, reference, options)}
    record["provenance"]["judge"] = judge
    record["provenance"]["inception_images_per_s"] = n / seconds if seconds else None
    print(json.dumps(record, sort_keys=True), flush=True)
    out = Path(cfg.out) if cfg.get("out") else _samples_dir(Path(cfg.samples)) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    with open(out.with_suffix(".jsonl"), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def _shape_labels(samples, n: int, path: str) -> np.ndarray:
    """The class ids the first `n` samples were asked for (arr_1 of sample.py's samples.npz), for the judge."""
    from latentdiff.data.shapes import SHAPE_NAMES

    labels = samples.array("arr_1")[:n] if "arr_1" in getattr(samples, "members", ()) else None
    if labels is None or labels.ndim != 1:
        raise ConfigError(
            f"metrics=[shapes] needs the class ids of samples={path} (arr_1 of the samples.npz that sample.py "
            "writes for a class-conditional shapes run)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(SHAPE_NAMES)):
        raise ConfigError(f"samples={path}: arr_1 holds class ids outside the {len(SHAPE_NAMES)} shapes")
    return labels


def _samples_dir(samples: Path) -> Path:
    return samples if samples.is_dir() else samples.parent


def _provenance(cfg: DictConfig, n: int, inception: Inception, reference, options: dict) -> dict[str, Any]:
    samples = Path(cfg.samples)
    provenance: dict[str, Any] = {"samples": str(samples.resolve()), "num_samples": n}
    meta_file = _samples_dir(samples) / "samples.json"
    if meta_file.is_file():  # written by sample.py
        meta = json.loads(meta_file.read_text())
        provenance.update({k: meta[k] for k in _SAMPLE_PROVENANCE if k in meta})
        provenance["samples_complete"] = meta.get("complete", False)
    provenance["reference"] = reference.provenance if reference is not None else None
    provenance["inception"] = inception.describe() if inception is not None else None
    provenance["fidelity_options"] = options
    provenance["versions"] = framework_versions()
    return provenance
