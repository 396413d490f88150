"""The runs of a sweep read into rows: what was swept, params and GFLOPs, img/s, losses and FID of each run directory
(one holding `config.yaml`). `latentdiff.report` turns the rows into the table and plots; the columns are
described there.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from latentdiff.errors import ConfigError

# latentdiff.callbacks.Throughput: images/s over all ranks, else one device's
_THROUGHPUT = ("train/samples_per_sec", "train/device/samples_per_sec")


@dataclass
class RunRow:
    """One run of the report."""

    run: str
    path: str
    swept: dict[str, str]
    model: str
    params_m: float
    gflops: float
    img_per_s: float | None
    step: int
    train_loss: float | None
    val_loss: float | None
    val_loss_ema: float | None
    fid: float | None
    fid_setup: str
    shape_acc: float | None = None  # the shapes judge's scores (`latentdiff.judge`), on the built-in data
    fd_shapes: float | None = None
    fd_shapes_floor: float | None = None
    shapes_setup: str = ""
    seed: str = ""  # the run's `seed` (config.yaml): what a sweep repeated over seeds groups by
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)

    @property
    def final_loss(self) -> float | None:
        """The loss the plots use: held-out EMA loss, else held-out loss, else the late train loss."""
        for value in (self.val_loss_ema, self.val_loss, self.train_loss):
            if value is not None:
                return value
        return None

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.swept.items() if v != "") or self.run


# -------------------------------------------------------------------------------------------- reading
def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories under `dirs`: each dir itself if it holds a run, else its children that do (sorted by
    Hydra's job number when the names are numbers)."""
    runs: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"dir={d} does not exist; give a multirun directory or run directories")
        if (d / "config.yaml").is_file():
            runs.append(d)
            continue
        children = [c for c in d.iterdir() if c.is_dir() and (c / "config.yaml").is_file()]
        children.sort(key=lambda c: (0, int(c.name), "") if c.name.isdigit() else (1, 0, c.name))
        runs += children
    if not runs:
        raise ConfigError(f"dir={','.join(map(str, dirs))} holds no runs (directories with a config.yaml)")
    return runs


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _float(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _last(rows: list[dict[str, str]], key: str) -> tuple[int, float] | None:
    for row in reversed(rows):
        value = _float(row.get(key))
        if value is not None:
            return int(float(row.get("step") or 0)), value
    return None


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        value = _float(row.get(key))
        if value is not None:
            out.append((int(float(row.get("step") or 0)), value))
    return out


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _newest_record(run: Path, metric: str) -> tuple[dict, dict] | None:
    """(metrics, provenance) of evaluate.py's newest metrics.json under `run` that holds `metric`."""
    records = []
    for path in run.rglob("metrics.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        values = record.get("metrics") or {}
        if values.get(metric) is not None:
            records.append((path.stat().st_mtime, values, record.get("provenance") or {}))
    return max(records, key=lambda r: r[0])[1:] if records else None


def _fid(run: Path, rows: list[dict[str, str]]) -> tuple[float | None, str]:
    """The run's FID and how it was measured: evaluate.py's newest metrics.json, else the FID callback's."""
    newest = _newest_record(run, "fid")
    if newest is not None:
        values, prov = newest
        fid = values["fid"]
        sampler = prov.get("sampler") or {}
        setup = f"FID-{prov.get('num_samples', '?')}"
        if isinstance(sampler, dict) and sampler:
            steps, w = sampler.get("steps"), sampler.get("guidance_scale")
            target = str((sampler.get("scheduler") or {}).get("_target_", "sampler"))
            name = next((p for p in target.split(".") if p.endswith("Scheduler")), target.split(".")[-1])
            setup += f", {name.removesuffix('Scheduler')} {steps} steps" + (f", w={w:g}" if w is not None else "")
        if prov.get("weights"):
            setup += f", {prov['weights']}"
        return float(fid), setup
    keys = sorted({k for r in rows for k in r if k.startswith("val/fid_")})
    for key in keys:
        found = _last(rows, key)
        if found is not None:
            return found[1], f"{key} (training callback, EMA)"
    return None, ""


def _shapes(run: Path, rows: list[dict[str, str]]) -> tuple[dict[str, float | None], str]:
    """The judge's scores of the run: evaluate.py's newest metrics.json with them, else the sample grid's last."""
    keys = ("shape_acc", "fd_shapes", "fd_shapes_floor")
    newest = _newest_record(run, "shape_acc")
    if newest is not None:
        values, prov = newest
        return {k: values.get(k) for k in keys}, f"evaluate.py, {prov.get('num_samples', '?')} samples"
    found = {k: _last(rows, f"val/{k}") for k in keys}
    if found["shape_acc"] is None:
        return dict.fromkeys(keys), ""
    return {k: v[1] if v else None for k, v in found.items()}, "sample grid (training callback, EMA)"


def _swept(runs: list[Path], configs: list[dict]) -> list[dict[str, str]]:
    """Per run: the override keys whose values differ between runs (the sweep's axes), in command order."""
    parsed = []
    for run in runs:
        pairs = {}
        for override in _overrides(run):
            key, _, value = override.partition("=")
            pairs[key.lstrip("+~")] = value
        parsed.append(pairs)
    keys: list[str] = []
    for pairs in parsed:
        keys += [k for k in pairs if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    if not varying and len(runs) > 1:  # runs gathered by hand: compare their model configs
        flat = [_flatten(c.get("model", {}), "model") for c in configs]
        all_keys = sorted({k for f in flat for k in f})
        varying_model = [k for k in all_keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
        return [{k: str(f.get(k)) for k in varying_model} for f in flat]
    return [{k: p.get(k, "") for k in varying} for p in parsed]


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}"))
    return out


def read_runs(dirs: list[Path]) -> list[RunRow]:
    """The report's rows for the runs under `dirs`."""
    from latentdiff.flops import config_cost

    runs = find_runs(dirs)
    configs = [OmegaConf.to_container(OmegaConf.load(r / "config.yaml")) for r in runs]
    swept = _swept(runs, configs)
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # several multirun dirs number their jobs alike: name the dir too
        names = [f"{r.parent.name}/{r.name}" for r in runs]
    costs: dict[str, Any] = {}
    rows = []
    for run, name, config, axes in zip(runs, names, configs, swept, strict=True):
        key = json.dumps([config.get("model"), config.get("data", {}).get("latent_size")], sort_keys=True)
        if key not in costs:
            costs[key] = config_cost(OmegaConf.create(config))
        cost = costs[key]
        metrics = _metrics_rows(run)
        train = _series(metrics, "train/loss")
        tail = [v for _, v in train[-max(1, len(train) // 10) :]]
        speeds = next((s for s in ([v for _, v in _series(metrics, k)] for k in _THROUGHPUT) if s), [])
        steps = [int(float(r["step"])) for r in metrics if r.get("step")]
        val, val_ema = _last(metrics, "val/loss"), _last(metrics, "val/loss_ema")
        fid, setup = _fid(run, metrics)
        shapes, shapes_setup = _shapes(run, metrics)
        curve = _series(metrics, "val/loss_ema") or _series(metrics, "val/loss")
        rows.append(
            RunRow(
                run=name,
                path=str(run),
                swept=axes,
                model=cost.model,
                params_m=cost.params / 1e6,
                gflops=cost.gmacs,
                img_per_s=statistics.median(speeds) if speeds else None,
                step=max(steps) + 1 if steps else 0,
                train_loss=statistics.fmean(tail) if tail else None,
                val_loss=val[1] if val else None,
                val_loss_ema=val_ema[1] if val_ema else None,
                fid=fid,
                fid_setup=setup,
                **shapes,
                shapes_setup=shapes_setup,
                seed=str(config.get("seed", "")),
                curve=curve,
            )
        )
    return rows


# -------------------------------------------------------------------------------------------- writing
