"""Pareto frontiers (hand-checked dominance), and the figures: files, axes, colours."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_hex
from run_folders import make_failed_sae, make_sae

from dictbench.report import leaderboard as lb
from dictbench.report import plots

# --- pareto_front -------------------------------------------------------------------------


def test_front_higher_is_better():
    l0 = [10, 20, 40, 40, 80]
    ce = [0.5, 0.4, 0.8, 0.7, 0.8]
    # (20, 0.4) is beaten by (10, 0.5); (40, 0.7) by (40, 0.8); (80, 0.8) by (40, 0.8)
    assert plots.pareto_front(np.array(l0), np.array(ce), "ce_loss_recovered").tolist() == [0, 2]


def test_front_lower_is_better():
    l0 = np.array([10.0, 20.0, 30.0, 5.0])
    fvu = np.array([0.3, 0.1, 0.2, 0.5])
    assert plots.pareto_front(l0, fvu, "fvu").tolist() == [3, 0, 1]


def test_front_nearer_one_is_better_and_nan_is_skipped():
    l0 = np.array([10.0, 20.0, 30.0, 40.0, np.nan])
    gamma = np.array([0.90, 1.05, 0.98, 1.03, 1.0])
    # distances from 1: 0.10, 0.05, 0.02, 0.03 -> (40, 1.03) is beaten by (30, 0.98)
    assert plots.pareto_front(l0, gamma, "relative_reconstruction_bias").tolist() == [0, 1, 2]


def test_method_colours_are_distinct_and_stable():
    baselines = {"l1": "l1", "gated": "gated", "mine": "mine", "run/l1": "l1"}
    colours = plots.method_colours(list(baselines), baselines)
    assert len(set(colours.values())) == 4
    assert colours["l1"] == plots.KNOWN_COLOURS["l1"]
    again = plots.method_colours(["mine", "gated"], {"mine": "mine", "gated": "gated"})
    assert again["gated"] == colours["gated"]


# --- figures ------------------------------------------------------------------------------


@pytest.fixture
def board(tmp_path) -> lb.Leaderboard:
    run = tmp_path / "run"
    hist = [0] * 20 + [3, 9, 12, 6, 2, 0, 0, 0, 0, 0, 0, 0]
    for sae, method, l0, ce, fvu, g in [
        ("l1-a", "l1", 12.0, 0.85, 0.25, 0.96),
        ("l1-b", "l1", 45.0, 0.95, 0.13, 0.97),
        ("gated-a", "gated", 40.0, 0.97, 0.10, 0.99),
        ("gated-b", "gated", 90.0, 0.99, 0.07, 1.0),
    ]:
        metrics = {"l0": l0, "ce_loss_recovered": ce, "fvu": fvu}
        metrics["relative_reconstruction_bias"] = g
        make_sae(run, sae, method, metrics, hist_counts=hist, n_dead=2)
    make_failed_sae(run, "gated-c", "gated", "NaN")
    return lb.build(lb.load_runs([run]))


def test_pareto_figure_axes_and_colours(board):
    fig = plots.pareto_figure(board, "ce_loss_recovered", "CE loss recovered (fraction)", 1.0)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "L0" in ax.get_xlabel() and "per token" in ax.get_xlabel()
    assert ax.get_ylabel() == "CE loss recovered (fraction)"
    lines = {ln.get_label().split()[0]: ln for ln in ax.get_lines() if ln.get_label()[0] != "_"}
    assert set(lines) == {"gated", "l1"}
    # the failed gated SAE is not drawn: two points each
    assert len(lines["gated"].get_xdata()) == 2 and "2 SAEs" in lines["gated"].get_label()
    assert lines["l1"].get_xdata().tolist() == [12.0, 45.0]
    # one method, one colour: its frontier line and its markers share it
    for method, line in lines.items():
        colour = to_hex(line.get_color())
        assert colour == plots.KNOWN_COLOURS[method]
    scatter_colours = {to_hex(c.get_facecolor()[0]) for c in ax.collections}
    assert scatter_colours == {plots.KNOWN_COLOURS["l1"], plots.KNOWN_COLOURS["gated"]}


def test_write_plots_files(board, tmp_path):
    out = tmp_path / "plots"
    paths = plots.write_plots(board, out)
    names = sorted(p.name for p in paths)
    stems = ["latent_density"] + [f"pareto_{m}" for m, _, _ in plots.PARETO_PLOTS]
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("png", "svg"))
    for p in paths:
        if p.suffix == ".png":
            img = matplotlib.image.imread(p)
            assert img.shape[1] >= 800  # wide enough to read at README size
        else:
            root = ET.parse(p).getroot()
            assert root.tag.endswith("svg")
    svg = (out / "pareto_fvu.svg").read_text()
    assert "fraction of variance unexplained" in svg and "active latents per token" in svg
    density = (out / "latent_density.svg").read_text()
    assert "2 dead" in density  # n_dead from the records reaches the legend


def test_plots_are_reproducible(board, tmp_path):
    a = plots.write_plots(board, tmp_path / "a")
    b = plots.write_plots(board, tmp_path / "b")
    for pa, pb in zip(a, b, strict=True):
        assert Path(pa).read_bytes() == Path(pb).read_bytes(), pa.name
