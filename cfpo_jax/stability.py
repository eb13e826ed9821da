"""What counts as a collapse, and the stability map of a study: pure numbers plus one plot.

The collapse rule (`outcome`), on windowed means — `w(i)` is the mean of the last `window` steps
ending at step i (only full windows count), `best(i)` the largest `w(j)` for j ≤ i, and the
drawdown `d(i) = best(i) − w(i)`:

  * a run is **down** at i when `d(i) > delta` (reason "reward") or the windowed entropy is below
    `entropy_floor` (reason "entropy"). A maximal stretch of down windows is an episode; it starts
    at its first window.
  * **collapse** (does not recover): an episode that lasts to the last window — the run ends more
    than delta below its best windowed reward, or with its windowed entropy under the floor. Its
    step is the episode's start: where the run fell and never came back. A non-finite reward, or an
    optimiser update the trainer refused (a rise of `skipped_updates`), is a collapse at that step
    whatever follows ("non-finite").
  * **dip** (transient): an episode that ends before the last window — the windowed reward came
    back to within delta of its best (or the entropy back over the floor). A run can have dips and
    a collapse; the first dip is reported with the count of dips.

Steps here are 0-based indices into the per-step arrays; callers map them to RL steps.

The map: for two axes x (e.g. μ, `rl.num_epochs`) and y (e.g. `optim.lr`) and each objective, per
cell the finished seeds n, collapsed seeds k, seeds with a dip, the mean final reward, and late-run
means of the diagnostics. The frontier at each y is the largest x whose cell has no collapsed seed
while no cell at a smaller x (same y) has one; cells without finished runs are skipped (they
neither extend nor end it); None where the smallest measured x already collapses. Between two
objectives, the collapse counts of a cell are compared with Fisher's exact test (two-sided,
scipy.stats.fisher_exact on the 2×2 table [[k_a, n_a − k_a], [k_b, n_b − k_b]]).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

MAP_METRICS = ("ratio_dev", "clip_frac", "entropy")


# ============================================================================ collapse and dips


@dataclasses.dataclass(frozen=True)
class Outcome:
    """collapse: (index, reason) or None; dips: every (index, reason) of a recovered episode."""

    collapse: tuple[int, str] | None
    dips: tuple[tuple[int, str], ...]


def window_means(x, window: int):
    """Means of x[i - window + 1 : i + 1] for i = window - 1, ..., len(x) - 1."""
    x = np.asarray(x, np.float64)
    if len(x) < window:
        return np.zeros(0)
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    return (cumsum[window:] - cumsum[:-window]) / window


def _episodes(down) -> list[tuple[int, int]]:
    """Maximal stretches of True in `down` as (first, last) index pairs."""
    down = np.asarray(down, bool)
    edges = np.flatnonzero(np.diff(np.r_[False, down, False].astype(np.int8)))
    return list(zip(edges[0::2].tolist(), (edges[1::2] - 1).tolist()))


def outcome(reward, entropy, skipped_updates, *, delta: float, window: int,
            entropy_floor: float) -> Outcome:
    """The collapse and the dips of one run (the rule in the module docstring).

    reward, entropy: per-step means; skipped_updates: the trainer's running count of refused
    optimiser updates. Indices are 0-based per-step positions (a window's index is its last step).
    """
    reward = np.asarray(reward, np.float64)
    skipped = np.asarray(skipped_updates, np.float64)
    collapses, dips = [], []
    bad = ~np.isfinite(reward) | (np.diff(skipped, prepend=0.0) > 0)
    if bad.any():
        collapses.append((int(np.argmax(bad)), "non-finite"))
    reward_w = window_means(np.where(np.isfinite(reward), reward, 0.0), window)
    entropy_w = window_means(entropy, window)
    for reason, down in (("reward", np.maximum.accumulate(reward_w) - reward_w > delta
                          if reward_w.size else np.zeros(0, bool)),
                         ("entropy", entropy_w < entropy_floor)):
        for first, last in _episodes(down):
            event = (first + window - 1, reason)
            (collapses if last == len(down) - 1 else dips).append(event)
    return Outcome(collapse=min(collapses) if collapses else None, dips=tuple(sorted(dips)))


# ============================================================================ the map


def fisher_p(collapsed_a: int, n_a: int, collapsed_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p-value that two objectives collapse equally often in a cell."""
    try:
        from scipy import stats
    except ImportError as e:
        raise ImportError("the study's map needs scipy: pip install 'cfpo_jax[study]'") from e
    table = [[collapsed_a, n_a - collapsed_a], [collapsed_b, n_b - collapsed_b]]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)


@dataclasses.dataclass(frozen=True)
class MapRun:
    """One finished run as the map needs it: its x, y and objective, its outcome and numbers."""

    x: object
    y: object
    objective: str
    collapsed: bool
    dipped: bool
    final: float
    late: dict  # MAP_METRICS -> late-run mean


@dataclasses.dataclass(frozen=True)
class MapCell:
    n: int
    collapsed: int
    dipped: int
    final: float  # mean over seeds; nan without runs
    late: dict  # MAP_METRICS -> mean over seeds

    @property
    def fraction(self) -> float:
        return self.collapsed / self.n if self.n else math.nan


def map_cells(runs: list[MapRun], xs, ys, objectives) -> dict[tuple, MapCell]:
    """(objective, x, y) -> MapCell over the runs of that cell, for every combination."""
    cells = {}
    for objective in objectives:
        for x in xs:
            for y in ys:
                group = [r for r in runs if (r.objective, r.x, r.y) == (objective, x, y)]
                cells[objective, x, y] = MapCell(
                    n=len(group), collapsed=sum(r.collapsed for r in group),
                    dipped=sum(r.dipped for r in group),
                    final=float(np.mean([r.final for r in group])) if group else math.nan,
                    late={k: float(np.mean([r.late[k] for r in group])) if group else math.nan
                          for k in MAP_METRICS})
    return cells


def frontier(cells: dict[tuple, MapCell], objective: str, xs, ys) -> dict:
    """y -> the largest x without a collapse at this or any smaller measured x (module docstring)."""
    out = {}
    for y in ys:
        out[y] = None
        for x in xs:
            cell = cells[objective, x, y]
            if not cell.n:
                continue
            if cell.collapsed:
                break
            out[y] = x
    return out


def map_table(cells, xs, ys, objectives, labels: dict, x_title: str, y_title: str) -> str:
    """The markdown table beside the map: per cell and objective the collapsed / dipped seeds, the
    final reward and the late-run diagnostics; Fisher's p of the first objective against each
    other one."""
    first, others = objectives[0], objectives[1:]
    header = [x_title, y_title]
    header += [f"{labels[o]} collapsed" for o in objectives]
    header += [f"p ({labels[first]} vs {labels[o]})" for o in others]
    header += [f"{labels[o]} dips" for o in objectives]
    header += [f"{labels[o]} final" for o in objectives]
    header += [f"{labels[o]} {k}" for k in MAP_METRICS for o in objectives]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: "—" if math.isnan(v) else f"{v:.3f}"
    for y in ys:
        for x in xs:
            group = [cells[o, x, y] for o in objectives]
            if not any(c.n for c in group):
                continue
            a = cells[first, x, y]
            row = [_text(x), _text(y)]
            row += [f"{c.collapsed}/{c.n}" if c.n else "—" for c in group]
            row += [f"{fisher_p(a.collapsed, a.n, c.collapsed, c.n):.3f}" if a.n and c.n else "—"
                    for c in (cells[o, x, y] for o in others)]
            row += [f"{c.dipped}/{c.n}" if c.n else "—" for c in group]
            row += [fmt(c.final) for c in group]
            row += [fmt(c.late[k]) for k in MAP_METRICS for c in group]
            rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_map(path: str, cells, xs, ys, objectives, labels: dict, x_title: str, y_title: str,
             title: str) -> None:
    """Writes the map PNG: a column per objective; top row the fraction of seeds collapsed (text
    `k/n`, and `+d dip` when seeds dipped), bottom row the mean final reward (text with `n=`); the
    frontier of each objective as a black staircase on both of its panels."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the study's plots need matplotlib: pip install 'cfpo_jax[study]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = [c.final for c in cells.values() if c.n and math.isfinite(c.final)]
    lo, hi = min([0.0, *finals]), max([1.0, *finals])  # rewards in [0, 1] share one scale
    fig, axes = plt.subplots(2, len(objectives), squeeze=False,
                             figsize=(1.2 * len(xs) * len(objectives) + 2.5, 1.0 * len(ys) * 2 + 2.2))
    for j, objective in enumerate(objectives):
        fraction = np.array([[cells[objective, x, y].fraction for x in xs] for y in ys])
        final = np.array([[cells[objective, x, y].final for x in xs] for y in ys])
        edge = frontier(cells, objective, xs, ys)
        for i, (values, cmap, vmin, vmax, name) in enumerate(
                ((fraction, "Reds", 0.0, 1.0, "fraction collapsed"),
                 (final, "viridis", lo, hi, "final reward"))):
            ax = axes[i][j]
            image = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, origin="lower",
                              cmap=matplotlib.colormaps[cmap].with_extremes(bad="lightgrey"),
                              aspect="auto")
            for yi, y in enumerate(ys):
                for xi, x in enumerate(xs):
                    c = cells[objective, x, y]
                    if not c.n:
                        text = "—"
                    elif i == 0:
                        text = f"{c.collapsed}/{c.n}" + (f"\n+{c.dipped} dip" if c.dipped else "")
                    else:
                        text = f"{c.final:.2f}\nn={c.n}"
                    dark = values[yi, xi] > 0.5 if i == 0 else values[yi, xi] < (lo + hi) / 2
                    ax.text(xi, yi, text, ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
            # The frontier: right edge of the frontier cell in each row (left edge when none),
            # joined across neighbouring rows; rows without a finished run have none.
            stairs = [[]]
            for yi, y in enumerate(ys):
                if not any(cells[objective, x, y].n for x in xs):
                    stairs.append([])
                    continue
                right = (xs.index(edge[y]) + 0.5) if edge[y] is not None else -0.5
                stairs[-1] += [(right, yi - 0.5), (right, yi + 0.5)]
            for k, segment in enumerate(s for s in stairs if s):
                ax.plot(*zip(*segment), color="black", linewidth=2.5,
                        label="frontier" if (i, j, k) == (0, 0, 0) else None)
            ax.set_xticks(range(len(xs)), [_text(x) for x in xs])
            ax.set_yticks(range(len(ys)), [_text(y) for y in ys])
            ax.set_xlim(-0.5, len(xs) - 0.5)
            ax.set_xlabel(x_title)
            ax.set_ylabel(y_title)
            ax.set_title(f"{labels[objective]}: {name}", fontsize=10)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    axes[0][0].legend(loc="upper left", fontsize="small", framealpha=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
