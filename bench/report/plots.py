"""Pareto plots and latent-density histograms for a leaderboard (matplotlib, PNG + SVG).

Why frontiers: a sweep trades sparsity for fidelity, so a method is judged by the best
fidelity it reaches at each L0. Every SAE is drawn as a faint marker; the line joins the
points no other SAE of the same method beats on both L0 and the metric.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no display
needed) and written atomically; SVG ids and metadata are fixed so that regenerating the
committed plots from the same records gives the same files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dictbench.io import atomic
from dictbench.report.leaderboard import Leaderboard, badness

# (metric, axis label with unit, reference line or None)
PARETO_PLOTS = [
    ("ce_loss_recovered", "CE loss recovered (fraction of zero-ablation loss)", 1.0),
    ("fvu", "fraction of variance unexplained (FVU)", None),
    ("relative_reconstruction_bias", "relative reconstruction bias γ (1 = unbiased)", 1.0),
]
L0_LABEL = "L0 (active latents per token, log scale)"

# One colour per method, stable across every figure and every run: known baselines get
# fixed colours, other methods the remaining ones in name order.
KNOWN_COLOURS = {
    "l1": "#1f77b4",
    "gated": "#ff7f0e",
    "e2e": "#2ca02c",
    "topk": "#d62728",
    "batchtopk": "#9467bd",
    "jumprelu": "#8c564b",
    "l1_april": "#e377c2",
    "e2e_ds": "#17becf",
}
SPARE_COLOURS = ["#7f7f7f", "#bcbd22", "#000000", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5"]
STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 11,
    "svg.hashsalt": "dictbench",
    "svg.fonttype": "none",  # text stays text: searchable, smaller, crisp at any size
}
DPI = 150


def method_colours(methods: list[str], baselines: dict[str, str]) -> dict[str, str]:
    """Colour per method label; ``baselines`` maps a label to its baseline name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    spare = iter(c for c in SPARE_COLOURS)
    for m in sorted(methods):
        c = KNOWN_COLOURS.get(baselines.get(m, m))
        if c is None or c in used:
            c = next(spare, "#333333")
        out[m] = c
        used.add(c)
    return out


def pareto_front(
    l0: np.ndarray, values: np.ndarray, metric: str, directions: dict[str, str] | None = None
) -> np.ndarray:
    """Indices of the Pareto-optimal points, sorted by L0: no other point has an L0 at
    most as large and a metric at least as good, with one of the two strictly better.
    Points with a missing L0 or value are never on the front."""
    l0 = np.asarray(l0, dtype=np.float64)
    bad = badness(metric, values, directions)
    ok = np.flatnonzero(np.isfinite(l0) & np.isfinite(bad))
    front = []
    for i in ok:
        dominated = any(
            l0[j] <= l0[i] and bad[j] <= bad[i] and (l0[j] < l0[i] or bad[j] < bad[i])
            for j in ok
            if j != i
        )
        if not dominated:
            front.append(i)
    return np.array(sorted(front, key=lambda i: (l0[i], bad[i])), dtype=int)


def _save(fig: Figure, stem: Path) -> list[Path]:
    paths = []
    for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=DPI, bbox_inches="tight", metadata=meta)
        path = stem.with_suffix(f".{ext}")
        atomic.write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _baselines(board: Leaderboard) -> dict[str, str]:
    return dict(zip(board.saes["method"], board.saes["baseline"], strict=True))


def _ok_saes(board: Leaderboard) -> pd.DataFrame:
    s = board.saes
    return s[s["status"] == "ok"] if not s.empty else s


def _log_l0_axis(ax) -> None:
    """Log-scaled L0 with plain tick labels at 1, 2, 5 x 10^k (matplotlib's default
    minor labels like "3x10^1" collide on short ranges)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_figure(board: Leaderboard, metric: str, ylabel: str, ref: float | None) -> Figure:
    saes = _ok_saes(board)
    methods = sorted(board.saes["method"].unique())
    colours = method_colours(methods, _baselines(board))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    drawn = 0
    for m in methods:
        sub = saes[saes["method"] == m]
        if "l0" not in sub or metric not in sub:
            continue
        l0 = sub["l0"].to_numpy(dtype=float)
        vals = sub[metric].to_numpy(dtype=float)
        ok = np.isfinite(l0) & (l0 > 0) & np.isfinite(vals)
        if not ok.any():
            continue
        front = pareto_front(l0, vals, metric, board.directions)
        ax.scatter(l0[ok], vals[ok], color=colours[m], alpha=0.35, s=36, zorder=2)
        ax.plot(
            l0[front],
            vals[front],
            color=colours[m],
            marker="o",
            markersize=7,
            linewidth=2,
            label=f"{m} ({ok.sum()} SAE{'s' if ok.sum() != 1 else ''})",
            zorder=3,
        )
        drawn += 1
    if ref is not None:
        ax.axhline(ref, color="#888888", linestyle=":", linewidth=1, zorder=1)
    from dictbench.report.plots_seeds import draw_seed_intervals

    draw_seed_intervals(ax, saes, metric, colours)  # seed means with 95% intervals, if any
    _log_l0_axis(ax)
    ax.set_xlabel(L0_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{metric}: Pareto frontier per method")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="best", frameon=True)
    else:
        ax.text(0.5, 0.5, f"no SAE has {metric}", ha="center", transform=ax.transAxes)
    return fig


def density_figure(board: Leaderboard) -> Figure:
    """One panel per method; one step line per SAE (its log10 density histogram)."""
    saes = _ok_saes(board)
    methods = sorted(board.saes["method"].unique())
    colours = method_colours(methods, _baselines(board))
    n = max(len(methods), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.set_visible(False)
            continue
        m = methods[k]
        sub = saes[saes["method"] == m]
        if "l0" in sub:
            sub = sub.sort_values("l0", na_position="last")
        lines = 0
        for i, (_, row) in enumerate(sub.iterrows()):
            hist = board.histograms.get((row["run"], row["sae_id"]))
            if not hist:
                continue
            edges = np.asarray(hist["log10_density_bin_edges"], dtype=float)
            counts = np.asarray(hist["counts"], dtype=float)
            l0 = row.get("l0", float("nan"))
            dead = int(hist.get("n_dead", 0))
            label = f"L0 {l0:.3g}" if np.isfinite(l0) else row["sae_id"]
            ax.stairs(
                counts,
                edges,
                color=colours[m],
                linestyle=styles[i % len(styles)],
                alpha=1.0 - 0.5 * i / max(len(sub), 1),
                linewidth=1.8,
                label=f"{label}, {dead} dead",
            )
            lines += 1
        ax.set_title(m)
        ax.set_xlabel("log10 firing frequency (fraction of tokens)")
        ax.set_ylabel("latents")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(loc="upper left", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no density histogram", ha="center", transform=ax.transAxes)
    fig.suptitle("Latent density (dead latents are not in the bars; counted in the legend)")
    fig.tight_layout()
    return fig


def write_plots(board: Leaderboard, out_dir: Path) -> list[Path]:
    """Write pareto_<metric>.{png,svg} and latent_density.{png,svg}; return the paths."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    with matplotlib.rc_context(STYLE):
        for metric, ylabel, ref in PARETO_PLOTS:
            paths += _save(pareto_figure(board, metric, ylabel, ref), out_dir / f"pareto_{metric}")
        paths += _save(density_figure(board), out_dir / "latent_density")
    return paths
