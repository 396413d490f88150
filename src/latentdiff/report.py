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
  guidance), else the last `val/fid_*` logged by `callbacks=fid`;
- shape acc and FD-shapes on the built-in data: the newest `evaluate.py metrics=[shapes]`, else the sample grid's.

A sweep repeated over seeds (`seed=0,1` on the sweep's command line) also gets a second table, one row per
setting with the mean and the min-max over its seeds (`latentdiff.sweep_seeds`), in report.md and `by_setting.csv`,
and its plot `by_setting.png`.

Writes `<out>/report.md`, `report.csv`, `report.json`, and plots `loss_vs_gflops.png`, `loss_vs_params.png`,
`val_loss_curves.png`, plus `fid_vs_gflops.png` and `fid_vs_params.png` when runs have an FID. `out` defaults
to `<dir>/report` (the first dir) and is refused if it holds anything but an earlier report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from latentdiff import sweep_seeds
from latentdiff.errors import ConfigError
from latentdiff.sweep_runs import RunRow, read_runs

_REPORT_FILES = {
    "report.md",
    "report.csv",
    "report.json",
    "loss_vs_gflops.png",
    "loss_vs_params.png",
    "fid_vs_gflops.png",
    "fid_vs_params.png",
    "val_loss_curves.png",
    "by_setting.csv",
    "by_setting.png",
}


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the report table (what report.md and report.csv hold)."""
    axes = list(rows[0].swept) if rows else []
    header = ["run", *axes, "model", "params (M)", "GFLOPs", "img/s", "step"]
    header += ["train loss", "val loss", "val loss (EMA)", "FID", "FID setup"]
    judged = any(r.shape_acc is not None for r in rows)  # the shapes judge's columns, on the built-in data
    if judged:
        header += ["shape acc", "FD-shapes", "FD-shapes floor", "shapes setup"]
    cells = []
    for r in rows:
        shapes = [_fmt(r.shape_acc, 3), _fmt(r.fd_shapes, 2), _fmt(r.fd_shapes_floor, 2), r.shapes_setup]
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
                *(shapes if judged else []),
            ]
        )
    return header, cells


def _md_table(header: list[str], cells: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]


def _markdown(
    header: list[str], cells: list[list[str]], dirs: list[Path], settings: tuple[list[str], list[list[str]]] | None
) -> str:
    lines = [f"# Sweep report: {', '.join(str(d) for d in dirs)}", "", *_md_table(header, cells)]
    if settings is not None:
        lines += ["", "## By setting (mean over the seeds, min-max in parentheses)", "", *_md_table(*settings)]
    lines += [
        "",
        "GFLOPs: forward multiply-accumulates per image (the U-ViT / DiT papers' count), torch's flop counter.",
        "img/s: training images per second over all ranks (median of the logged windows).",
        "train loss: mean of the last 10% of logged steps; val loss: the last held-out value.",
    ]
    if "shape acc" in header:
        lines.append(
            "shape acc, FD-shapes: the built-in shapes judge (latentdiff.judge): the fraction of samples of the "
            "class asked for, and the Frechet distance of its features to real shapes (floor: real vs real)."
        )
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
    groups = sweep_seeds.by_setting(runs)  # one colour per setting, one line style per seed of a setting
    setting_of = {path: i for i, g in enumerate(groups) for path in g.runs}
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    seeded = sweep_seeds.is_seeded(runs)
    for r in runs:
        i = setting_of[r.path]
        seed_index = groups[i].runs.index(r.path)
        style = ("-", "--", ":", "-.")[seed_index % 4] if seeded else "-"
        label = f"{groups[i].label}, seed={r.seed}" if seeded else r.label
        xs, ys = [s for s, _ in r.curve], [v for _, v in r.curve]
        ax.plot(xs, ys, style, color=colours[i % len(colours)], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (EMA when logged)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _csv(path: Path, header: list[str], cells: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)


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
    groups = sweep_seeds.by_setting(rows) if sweep_seeds.is_seeded(rows) else None
    settings = sweep_seeds.table(groups) if groups else None
    (out / "report.md").write_text(_markdown(header, cells, dirs, settings))
    _csv(out / "report.csv", header, cells)
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
    if groups:
        _csv(out / "by_setting.csv", *sweep_seeds.numbers(groups))
        files.append(out / "by_setting.csv")
        if sweep_seeds.plot(groups, out / "by_setting.png"):
            files.append(out / "by_setting.png")
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
