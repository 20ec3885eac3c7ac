"""The static leaderboard page (bench/report/html_page.py), checked in a real headless Chromium
driven over the DevTools protocol (tests/headless_chromium.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dictbench.cli import main
from dictbench.report import html_page, leaderboard

sys.path.insert(0, str(Path(__file__).parent))
from headless_chromium import Browser, find_chromium  # noqa: E402
from run_folders import make_failed_sae, make_sae, write_run_json  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference-synthetic"


def _metric(run: Path, sae: str, task: str, name: str) -> float:
    return json.loads((run / "results" / sae / f"{task}.json").read_text())["metrics"][name]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """reference-synthetic plus one SAE whose training failed."""
    run = tmp_path_factory.mktemp("page") / "reference-synthetic"
    shutil.copytree(REFERENCE, run)
    make_failed_sae(run, "broken", "l1", "CUDA out of memory")
    return run


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "board.html"
    assert main(["leaderboard", str(run_dir), "--html", str(out), "--format", "csv"]) == 0
    return out


def test_page_is_self_contained(page):
    text = page.read_text()
    assert "default-src 'none'" in text  # the browser itself forbids any fetch
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in text.replace("http://www.w3.org/2000/svg", ""), needle


def test_inlined_data_cannot_close_the_script(tmp_path):
    run = tmp_path / "r"
    make_sae(run, "x", "l1</script><b>", {"l0": 10.0, "explained_variance": 0.5})
    write_run_json(run)
    text = html_page.render_page(leaderboard.build(leaderboard.load_runs([run])))
    assert "l1</script>" not in text and "l1\\u003c/script\\u003e" in text


needs_browser = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")


@pytest.fixture(scope="module")
def browser(page):
    pytest.importorskip("websocket", reason="websocket-client (test extra) is missing")
    if find_chromium() is None:
        pytest.skip("no chromium on PATH")
    with Browser(find_chromium()) as b:
        b.open(page.as_uri())
        yield b


@needs_browser
def test_table_sorts_by_a_clicked_column(browser, run_dir):
    ids = [p.name for p in (run_dir / "results").iterdir() if p.name != "broken"]
    by_l0 = sorted(ids, key=lambda s: _metric(run_dir, s, "sparsity", "l0"))
    click = "document.querySelector('#sae-table th[data-col=\"l0\"]').click()"
    ids_js = (
        "[...document.querySelectorAll('#sae-table tbody tr')].map(r => r.cells[1].textContent)"
    )
    browser.eval(click)
    shown = browser.eval(ids_js)
    assert shown[: len(by_l0)] == by_l0 and shown[-1] == "broken"  # no number sorts last
    browser.eval(click)
    assert browser.eval(ids_js)[: len(by_l0)] == by_l0[::-1]


@needs_browser
def test_plot_has_a_point_per_sae_and_redraws_for_another_metric(browser, run_dir):
    ids = [p.name for p in (run_dir / "results").iterdir() if p.name != "broken"]
    assert browser.eval("document.querySelectorAll('#plot circle.pt').length") == len(ids)
    browser.eval(
        "const s = document.getElementById('y-metric'); s.value = 'cossim';"
        "s.dispatchEvent(new Event('change'))"
    )
    assert browser.eval("document.getElementById('plot').getAttribute('data-metric')") == "cossim"
    # SVG y grows downwards: the SAE with the highest cossim has the smallest cy.
    best = max(ids, key=lambda s: _metric(run_dir, s, "reconstruction", "cossim"))
    top = browser.eval(
        "[...document.querySelectorAll('#plot circle.pt')]"
        ".sort((a, b) => a.cy.baseVal.value - b.cy.baseVal.value)[0].getAttribute('data-key')"
    )
    assert top == f"reference-synthetic|{best}"
    assert browser.eval("document.querySelectorAll('#plot circle.pt').length") == len(ids)


@needs_browser
def test_method_toggle_hides_its_points(browser):
    n = browser.eval("document.querySelectorAll('#plot circle.pt').length")
    browser.eval("document.querySelector('input[data-method=\"gated\"]').click()")
    assert browser.eval("document.querySelectorAll('#plot circle.pt').length") == n - 1
    browser.eval("document.querySelector('input[data-method=\"gated\"]').click()")


@needs_browser
def test_failed_sae_reads_failed(browser):
    cells = browser.eval(
        "[...document.querySelector('#sae-table tr[data-key=\"reference-synthetic|broken\"]')"
        ".cells].map(c => c.textContent)"
    )
    assert cells[3] == "failed" and set(cells[4:]) == {"failed"}


@needs_browser
def test_panel_shows_histogram_and_training_cost(browser, run_dir):
    browser.eval(
        "document.querySelector('#sae-table tr[data-key=\"reference-synthetic|l1\"]').click()"
    )
    hist = json.loads((run_dir / "results" / "l1" / "dead_latents.json").read_text())
    n_bins = len(hist["details"]["log10_density_hist"]["counts"])
    assert browser.eval("document.querySelectorAll('#panel svg.hist rect').length") == n_bins
    assert "wall_seconds" in browser.eval("document.getElementById('panel').textContent")


@needs_browser
def test_page_makes_no_network_request(browser, page):
    assert browser.console_errors() == []
    assert browser.requests() == [page.as_uri()]


def _seeded_run(run: Path) -> Path:
    """Two methods x two settings x three seeds; per setting ev = base + 0.01 * seed."""
    for method, base in (("l1", 0.70), ("gated", 0.75)):
        for k, l0 in ((1, 10.0), (2, 40.0)):
            for seed in range(3):
                ev = base + 0.1 * (k - 1) + 0.01 * seed
                sid = f"{method}-k={k}@seed{seed}"
                make_sae(run, sid, method, {"l0": l0 + seed, "explained_variance": ev})
    write_run_json(run)
    return run


def test_seed_groups_carry_t_intervals(tmp_path):
    board = leaderboard.build(leaderboard.load_runs([_seeded_run(tmp_path / "s")]))
    groups = {g["setting"]: g for g in html_page.page_data(board)["groups"]}
    ev = groups["l1-k=1"]["stats"]["explained_variance"]
    half = 4.303 * 0.01 / 3**0.5  # t(2) * sd / sqrt(n), sd of 0.70, 0.71, 0.72 is 0.01
    assert ev["kind"] == "t95" and ev["mean"] == pytest.approx(0.71)
    assert (ev["lo"], ev["hi"]) == pytest.approx((0.71 - half, 0.71 + half))


@needs_browser
def test_seeded_page_draws_error_bars(tmp_path):
    pytest.importorskip("websocket", reason="websocket-client (test extra) is missing")
    out = tmp_path / "seeded.html"
    assert main(["leaderboard", str(_seeded_run(tmp_path / "s")), "--html", str(out)]) == 0
    with Browser(find_chromium()) as b:
        b.open(out.as_uri())
        assert b.eval("document.querySelectorAll('#plot circle.pt').length") == 12
        assert b.eval("document.querySelectorAll('#plot rect.groupmean').length") == 4
        assert b.eval("document.querySelectorAll('#group-table tr').length") == 1 + 4
        # both axes: an L0 and a metric bar per setting (L0 differs across seeds here)
        assert b.eval("document.querySelectorAll('#plot g.errorbar line').length") == 8
        assert b.requests() == [out.as_uri()]


def test_autointerp_panel_data_from_the_record(tmp_path):
    from run_folders import CONTEXT

    from dictbench.score.records import RecordTarget, write_record

    run = tmp_path / "ai"
    make_sae(run, "x", "l1", {"l0": 10.0, "explained_variance": 0.5})
    latents = [
        {"latent": 7, "explanation": "dates", "detection": {"balanced_accuracy": 0.8},
         "top_windows": [{"tokens": ["in", " 1990"], "acts": [0.0, 2.5]}]},
        {"latent": 9, "error": "explain: empty reply"},
    ]  # fmt: skip
    target = RecordTarget(run, "x", "l1", CONTEXT)
    metrics = {"detection_balanced_accuracy": 0.8}
    write_record(target, "autointerp", metrics, {"latents": latents}, 65659)
    write_run_json(run)
    panel = html_page.page_data(leaderboard.build(leaderboard.load_runs([run])))["panels"]["ai|x"]
    first, second = panel["autointerp"]
    assert first["explanation"] == "dates" and first["scores"] == {"detection": 0.8}
    assert first["windows"] == [{"tokens": ["in", " 1990"], "acts": [0.0, 2.5]}]
    assert second["error"] == "explain: empty reply" and second["windows"] == []


def test_page_shows_the_seed_records_carry(tmp_path):
    run = tmp_path / "c"
    make_sae(run, "x", "l1", {"l0": 10.0}, context={"sae_seed": 5})
    make_sae(run, "y@seed3", "l1", {"l0": 12.0})
    write_run_json(run)
    rows = html_page.page_data(leaderboard.build(leaderboard.load_runs([run])))["saes"]
    assert {r["sae_id"]: r["seed"] for r in rows} == {"x": 5, "y@seed3": 3}
