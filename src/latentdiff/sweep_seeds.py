"""The runs of a sweep grouped by setting over their seeds: an ablation repeated with `seed=0,1` gives one row per
setting with the mean of each number and its spread (min and max over the seeds).

A run's setting is its swept values except `seed` (`latentdiff.sweep_runs.RunRow.swept`); its seed is the one in its
config.yaml, given on the command line or not. `latentdiff.report` writes these rows as the second table of report.md,
as numbers in `by_setting.csv` (mean, min, max and how many seeds have the number), and plots them (`by_setting.png`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from latentdiff.sweep_runs import RunRow

SEED_KEYS = ("seed",)  # the swept keys that repeat a setting instead of changing it
COLUMNS = (  # the numbers averaged over seeds: RunRow attribute, title, digits
    ("shape_acc", "shape acc", 3),
    ("fd_shapes", "FD-shapes", 2),
    ("val_loss_ema", "val loss (EMA)", 4),
    ("fid", "FID", 2),
    ("img_per_s", "img/s", 1),
)


@dataclass
class Spread:
    """Mean, min and max of one number over the seeds of a setting (the values themselves, in seed order)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    def text(self, digits: int, seeds: int) -> str:
        """`mean (min-max)`; `, n=k` when only k of the setting's seeds have the number."""
        short = f", n={len(self.values)}" if len(self.values) < seeds else ""
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f}" + (" (n=1)" if short else "")
        return f"{self.mean:.{digits}f} ({min(self.values):.{digits}f}-{max(self.values):.{digits}f}{short})"


@dataclass
class SettingRow:
    """One setting: its swept values (seed left out), the seeds it ran with and the spread of each number."""

    setting: dict[str, str]
    seeds: list[str]
    runs: list[str]
    numbers: dict[str, Spread] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.setting.items() if v != "") or "(base)"


def is_seeded(rows: list[RunRow]) -> bool:
    """Whether the sweep repeats settings over seeds: some setting ran with more than one seed."""
    return any(len(set(g.seeds)) > 1 for g in by_setting(rows))


def by_setting(rows: list[RunRow]) -> list[SettingRow]:
    """Group the runs by their swept values other than the seed, in the order the settings first appear."""
    groups: dict[tuple[tuple[str, str], ...], SettingRow] = {}
    for r in rows:
        setting = {k: v for k, v in r.swept.items() if k not in SEED_KEYS}
        key = tuple(setting.items())
        group = groups.setdefault(key, SettingRow(setting=setting, seeds=[], runs=[]))
        group.seeds.append(r.seed)
        group.runs.append(r.path)
        for name, _, _ in COLUMNS:
            value = getattr(r, name)
            if value is not None:
                group.numbers.setdefault(name, Spread([])).values.append(float(value))
    return list(groups.values())


def _shown(groups: list[SettingRow]) -> list[tuple[str, str, int]]:
    return [c for c in COLUMNS if any(c[0] in g.numbers for g in groups)]


def table(groups: list[SettingRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the by-setting table (report.md); a column only where some setting has that number."""
    shown = _shown(groups)
    axes = list(groups[0].setting) if groups else []
    header = [*axes, "seeds", *(f"{title} mean (min-max)" for _, title, _ in shown)]
    cells = []
    for g in groups:
        n = len(g.seeds)
        numbers = [g.numbers[name].text(digits, n) if name in g.numbers else "" for name, _, digits in shown]
        cells.append([*(g.setting.get(a, "") for a in axes), ",".join(g.seeds), *numbers])
    return header, cells


def numbers(groups: list[SettingRow]) -> tuple[list[str], list[list[str]]]:
    """The same rows as plain numbers (by_setting.csv): mean, min, max and n of each number."""
    shown = _shown(groups)
    axes = list(groups[0].setting) if groups else []
    header = [*axes, "seeds"]
    for name, _, _ in shown:
        header += [f"{name}_mean", f"{name}_min", f"{name}_max", f"{name}_n"]
    cells = []
    for g in groups:
        row = [*(g.setting.get(a, "") for a in axes), " ".join(g.seeds)]
        for name, _, _ in shown:
            spread = g.numbers.get(name)
            row += (
                [repr(spread.mean), repr(min(spread.values)), repr(max(spread.values)), str(len(spread.values))]
                if spread
                else ["", "", "", "0"]
            )
        cells.append(row)
    return header, cells


def plot(groups: list[SettingRow], path) -> bool:
    """One panel per judged number (shape accuracy, FD-shapes; else the final loss): each seed a dot, the mean a
    black tick, one row per setting. Returns False when there is nothing to plot."""
    names = [n for n in ("shape_acc", "fd_shapes") if any(n in g.numbers for g in groups)] or ["val_loss_ema"]
    names = [n for n in names if any(n in g.numbers for g in groups)]
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "shape_acc": "shape accuracy (higher is better)",
        "fd_shapes": "FD-shapes (lower is better)",
        "val_loss_ema": "held-out loss, EMA (lower is better)",
    }
    height = 1.2 + 0.32 * len(groups)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names) + 1.6, height), dpi=120, squeeze=False)
    y = list(range(len(groups)))
    for ax, name in zip(axes[0], names, strict=True):
        for i, g in enumerate(groups):
            spread = g.numbers.get(name)
            if spread is None:
                continue
            ax.scatter(spread.values, [i] * len(spread.values), color="tab:blue", s=14, alpha=0.6, zorder=3)
            ax.scatter([spread.mean], [i], color="black", marker="|", s=220, zorder=4)
        ax.set_yticks(y, [g.label for g in groups] if ax is axes[0][0] else [""] * len(groups), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(titles[name], fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        if name == "fd_shapes":
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
