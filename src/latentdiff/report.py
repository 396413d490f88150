"""Compare the runs of a sweep: one table (markdown + CSV + JSON) and the plots people look at.

    python -m latentdiff.report dir=outputs/<name>/multirun_<date>_<time>      # a Hydra multirun directory
    python -m latentdiff.report dir=[outputs/a/2026-11-01_10-00-00,outputs/b/...] out=reports/ablation

Each run directory (one holding `config.yaml`) gives a row:

- the swept values: the override keys whose values differ between the runs (from `.hydra/overrides.yaml`,
  else the resolved configs' differing `model.*` keys);
- params and GFLOPs of its backbone (`latentdiff.flops`; GFLOPs as the U-ViT and DiT papers count them:
  forward multiply-accumulates per image);
- img/s: the training throughput over all ranks (`latentdiff.callbacks.Throughput`, `train/samples_per_sec` in
  metrics.csv), the median of the logged windows;
- the final step and losses: the last `val/loss`, `val/loss_ema` and the mean train loss of the last 10% of
  the logged steps;
- FID: the newest `metrics.json` of `evaluate.py` under the run directory (with its number of samples, steps and
  guidance), else the last `val/fid_*` logged by `callbacks=fid`.

Writes `<out>/report.md`, `report.csv`, `report.json`, and plots `loss_vs_gflops.png`, `loss_vs_params.png`,
`val_loss_curves.png`, plus `fid_vs_gflops.png` and `fid_vs_params.png` when runs have an FID. `out` defaults
to `<dir>/report` (the first dir) and is refused if it holds anything but an earlier report.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from latentdiff.errors import ConfigError

_REPORT_FILES = {
    "report.md",
    "report.csv",
    "report.json",
    "loss_vs_gflops.png",
    "loss_vs_params.png",
    "fid_vs_gflops.png",
    "fid_vs_params.png",
    "val_loss_curves.png",
}
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
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.swept.items()) or self.run


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


def _fid(run: Path, rows: list[dict[str, str]]) -> tuple[float | None, str]:
    """The run's FID and how it was measured: evaluate.py's newest metrics.json, else the FID callback's."""
    records = []
    for path in run.rglob("metrics.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        fid = (record.get("metrics") or {}).get("fid")
        if fid is not None:
            records.append((path.stat().st_mtime, fid, record.get("provenance") or {}))
    if records:
        _, fid, prov = max(records, key=lambda r: r[0])
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
    costs: dict[str, Any] = {}
    rows = []
    for run, config, axes in zip(runs, configs, swept, strict=True):
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
        curve = _series(metrics, "val/loss_ema") or _series(metrics, "val/loss")
        rows.append(
            RunRow(
                run=run.name,
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
                curve=curve,
            )
        )
    return rows


# -------------------------------------------------------------------------------------------- writing
def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the report table (what report.md and report.csv hold)."""
    axes = list(rows[0].swept) if rows else []
    header = ["run", *axes, "model", "params (M)", "GFLOPs", "img/s", "step"]
    header += ["train loss", "val loss", "val loss (EMA)", "FID", "FID setup"]
    cells = []
    for r in rows:
        cells.append(
            [
                r.run,
                *(r.swept.get(a, "") for a in axes),
                r.model,
                _fmt(r.params_m, 2),
                f"{r.gflops:.1f}" if r.gflops >= 10 else f"{r.gflops:.3g}",
                _fmt(r.img_per_s, 1),
                str(r.step),
                _fmt(r.train_loss, 4),
                _fmt(r.val_loss, 4),
                _fmt(r.val_loss_ema, 4),
                _fmt(r.fid, 2),
                r.fid_setup,
            ]
        )
    return header, cells


def _markdown(header: list[str], cells: list[list[str]], dirs: list[Path]) -> str:
    lines = [
        f"# Sweep report: {', '.join(str(d) for d in dirs)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    lines += [
        "",
        "GFLOPs: forward multiply-accumulates per image (the U-ViT / DiT papers' count), torch's flop counter.",
        "img/s: training images per second over all ranks (median of the logged windows).",
        "train loss: mean of the last 10% of logged steps; val loss: the last held-out value.",
    ]
    return "\n".join(lines) + "\n"


def _scatter(rows: list[RunRow], x: str, y: str, path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(getattr(r, x), getattr(r, y), r.label) for r in rows if getattr(r, y) is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=36, color="tab:blue", zorder=3)
    for px, py, label in points:
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    span = max(p[0] for p in points) / max(min(p[0] for p in points), 1e-12)
    if span > 20:
        ax.set_xscale("log")
    ax.set_xlabel({"gflops": "GFLOPs (forward MACs per image)", "params_m": "parameters (M)"}[x])
    ax.set_ylabel({"final_loss": "final loss (held-out EMA when logged)", "fid": "FID"}[y])
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _curves(rows: list[RunRow], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r.curve]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in runs:
        ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], marker="o", markersize=3, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (EMA when logged)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a directory for the report")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in _REPORT_FILES]
        if foreign:
            raise ConfigError(
                f"out={out} holds files that are not a report ({', '.join(sorted(foreign)[:3])}); "
                "choose an empty or new directory"
            )


def write_report(dirs: list[Path], out: Path | None = None) -> dict[str, Any]:
    """Read the runs under `dirs` and write the report into `out` (default `<dirs[0]>/report`).

    Returns:
        {"rows": [...], "files": [...written paths]}.
    """
    out = Path(out) if out is not None else dirs[0] / "report"
    _check_out(out)
    rows = read_runs(dirs)
    header, cells = table(rows)
    out.mkdir(parents=True, exist_ok=True)
    for name in _REPORT_FILES:  # a report replaces an earlier one whole (no stale FID plot)
        (out / name).unlink(missing_ok=True)
    files = []
    (out / "report.md").write_text(_markdown(header, cells, dirs))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    records = [{**{k: v for k, v in asdict(r).items() if k != "curve"}, "final_loss": r.final_loss} for r in rows]
    (out / "report.json").write_text(json.dumps(records, indent=1) + "\n")
    files += [out / "report.md", out / "report.csv", out / "report.json"]
    plots = [
        ("gflops", "final_loss", "loss_vs_gflops.png", "final loss vs compute"),
        ("params_m", "final_loss", "loss_vs_params.png", "final loss vs size"),
        ("gflops", "fid", "fid_vs_gflops.png", "FID vs compute"),
        ("params_m", "fid", "fid_vs_params.png", "FID vs size"),
    ]
    for x, y, name, title in plots:
        if _scatter(rows, x, y, out / name, title):
            files.append(out / name)
    if _curves(rows, out / "val_loss_curves.png"):
        files.append(out / "val_loss_curves.png")
    return {"rows": records, "files": [str(f) for f in files], "markdown": (out / "report.md").read_text()}


def _parse(argv: list[str]) -> tuple[list[Path], Path | None]:
    dirs: list[Path] = []
    out = None
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"{arg!r} is not key=value; use dir=<multirun dir> [out=<dir>]")
        if key == "dir":
            items = value.strip("[]").split(",") if value.startswith("[") else [value]
            dirs += [Path(v.strip()) for v in items if v.strip()]
        elif key == "out":
            out = Path(value)
        else:
            raise ConfigError(f"{key}={value} is not an option; use dir=<multirun dir> [out=<dir>]")
    if not dirs:
        raise ConfigError("dir is missing; use dir=outputs/<name>/multirun_<date>_<time> (or dir=[run1,run2])")
    return dirs, out


def main(argv: list[str] | None = None) -> None:
    """`python -m latentdiff.report dir=<multirun dir> [out=<dir>]`: print the table, write the files."""
    from latentdiff.cli import plain_entry

    result = plain_entry(lambda args: write_report(*_parse(args)), argv, __doc__)
    if result is not None:
        print(result["markdown"], end="")
        print("wrote " + ", ".join(result["files"]))


if __name__ == "__main__":
    main()
