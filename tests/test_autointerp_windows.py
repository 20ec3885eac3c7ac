"""The top activating windows autointerp records per latent, and how the leaderboard page
shows them.

The letter world of test_autointerp (latent j fires exactly on letter j, with the
activation stored in the inputs) gives every expected window independently of the task:
which windows are top, which tokens are active and by how much. The judge is a scripted
OpenAI-compatible HTTP server, so what the explainer was shown is read from the requests
it received, not from the task's own data structures.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from openai_stub_server import StubJudge
from test_autointerp import (
    LETTERS,
    LetterSAE,
    _excerpts,
    _kind,
    options,
    perfect_judge,
    run_task,
    synthetic_env,
)

sys.path.insert(0, str(Path(__file__).parent))
from headless_chromium import Browser, find_chromium  # noqa: E402
from run_folders import CONTEXT, make_sae, write_run_json  # noqa: E402

from dictbench.cli import main  # noqa: E402
from dictbench.score.records import RecordTarget, write_record  # noqa: E402


def explain_requests(stub: StubJudge) -> list[list[str]]:
    """The excerpts of every explanation request the judge received."""
    return [_excerpts(r["messages"]) for r in stub.log if _kind(r["messages"]) == "explain"]


def hand_render(tokens: list[str], acts: list[float]) -> str:
    """An excerpt as the explainer is meant to see it, for single-letter tokens: active
    tokens between << and >> (every active token here is far above 1% of the peak)."""
    return "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(tokens, acts, strict=True))


def window_peaks(env, letter: str) -> np.ndarray:
    """Each window's peak activation of the letter's latent, straight from the inputs
    (one 21-token window per sequence, after BOS), highest first."""
    acts = env.eval_acts[:, 1:, ord(letter)]
    return np.sort(acts.max(axis=1))[::-1]


def test_record_holds_the_top_windows_the_explainer_was_shown(tmp_path):
    with StubJudge(perfect_judge) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=len(LETTERS)))
        res = run_task(env)
        shown = explain_requests(stub)
    assert len(shown) == len(LETTERS)
    for lat in res.details["latents"]:
        letter = LETTERS[lat["latent"]]
        windows = lat["top_windows"]
        assert len(windows) == 5  # record_windows' default, below n_explain_top (10)
        rendered = [hand_render(w["tokens"], w["acts"]) for w in windows]
        # exactly one explanation request began with these windows, in this order
        assert sum(excerpts[:5] == rendered for excerpts in shown) == 1
        for w in windows:
            assert len(w["tokens"]) == len(w["acts"]) == 21
            active = {t for t, a in zip(w["tokens"], w["acts"], strict=True) if a > 0}
            assert active == {letter}
        # the top five windows by peak activation, highest first, to 4 significant digits
        peaks = [max(w["acts"]) for w in windows]
        assert peaks == pytest.approx(window_peaks(env, letter)[:5].tolist(), rel=5e-4)
        assert peaks == sorted(peaks, reverse=True)


def test_token_activations_are_the_inputs_own_values(tmp_path):
    """Every recorded activation is the magnitude the letter world put at that token."""
    with StubJudge(perfect_judge) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=2))
        res = run_task(env)
    rows = env.eval_token_ids[:, 1:]
    for lat in res.details["latents"]:
        letter = ord(LETTERS[lat["latent"]])
        for w in lat["top_windows"]:
            ids = [ord(t) for t in w["tokens"]]
            seq = [s for s in range(len(rows)) if rows[s].tolist() == ids]
            assert len(seq) == 1  # the window is one held-out sequence's text
            want = np.where(rows[seq[0]] == letter, env.eval_acts[seq[0], 1:, letter], 0.0)
            assert w["acts"] == pytest.approx(want.tolist(), rel=5e-4)


def test_recording_never_changes_what_the_judge_sees(tmp_path):
    """record_windows bounds the record only: the prompts stay the same (the rerun with
    another setting is answered from the reply cache alone), capped at n_explain_top,
    and a latent whose explanation failed keeps its windows."""

    def no_explanation(messages):
        return "" if _kind(messages) == "explain" else "None"

    with StubJudge(no_explanation) as stub:
        kw = {"n_latents": 3, "n_explain_top": 3}
        first = run_task(synthetic_env(options(stub, tmp_path, record_windows=9, **kw)))
        n_sent = len(stub.log)
        second = run_task(synthetic_env(options(stub, tmp_path, record_windows=0, **kw)))
        assert len(stub.log) == n_sent and second.details["judge"]["cache_hits"] == n_sent
    for lat in first.details["latents"]:
        assert "empty explanation" in lat["error"] and len(lat["top_windows"]) == 3
    assert all("top_windows" not in lat for lat in second.details["latents"])


def test_record_windows_must_not_be_negative():
    from dictbench.errors import SpecError
    from dictbench.tasks.autointerp_config import parse_options

    with pytest.raises(SpecError, match="record_windows: must be at least 0"):
        parse_options({"record_windows": -1})


# --- the page, in a real browser ----------------------------------------------------------

HOSTILE = {
    ord("a"): "<script>window.__pwned = 1</script>",
    ord("b"): '<img src=x onerror="window.__pwned = 2">',
}


class HostileTokenizer:
    """Bytes, except that letters a and b decode to markup a page must show as text."""

    def decode(self, ids):
        return "".join(HOSTILE.get(int(i), chr(int(i))) for i in ids if int(i) < 256)


def _explain_hostile(messages):
    if _kind(messages) == "explain":
        return "<b>bold</b> &amp; tokens"
    return "1, 2"


@pytest.fixture(scope="module")
def autointerp_page(tmp_path_factory):
    """A run folder whose autointerp record comes from the task itself (letters a, b, c)."""
    base = tmp_path_factory.mktemp("ai_page")
    with StubJudge(_explain_hostile) as stub:
        env = synthetic_env(options(stub, base / "cache", n_latents=3, record_windows=3))
        env.subject = SimpleNamespace(tokenizer=HostileTokenizer())
        res = run_task(env, LetterSAE("abc"))
    run = base / "ai"
    make_sae(run, "x", "l1", {"l0": 10.0, "explained_variance": 0.5})
    write_record(
        RecordTarget(run, "x", "l1", CONTEXT), "autointerp", res.metrics, res.details, 2520
    )
    write_run_json(run)
    out = base / "page.html"
    assert main(["leaderboard", str(run), "--html", str(out)]) == 0
    return out, json.loads((run / "results/x/autointerp.json").read_text())["details"]


needs_browser = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")


@needs_browser
def test_panel_highlights_active_tokens_in_proportion(autointerp_page):
    pytest.importorskip("websocket", reason="websocket-client (test extra) is missing")
    page, details = autointerp_page
    lat = next(x for x in details["latents"] if x["latent"] == 2)  # letter c: plain text
    acts = [a for w in lat["top_windows"] for a in w["acts"]]
    want = [(round(a / max(acts), 3), "c") for a in acts if a > 0]
    with Browser(find_chromium()) as b:
        b.open(page.as_uri())
        b.eval("document.querySelector('#sae-table tr[data-key=\"ai|x\"]').click()")
        assert b.eval("document.querySelectorAll('#panel .latent').length") == 3
        row = "document.querySelector('#panel .latent[data-latent=\"2\"]')"
        assert b.eval(f"{row}.querySelectorAll('.win').length") == 3
        spans = b.eval(
            f"[...{row}.querySelectorAll('span.on')].map(s => "
            "[parseFloat(s.style.getPropertyValue('--a')), s.textContent])"
        )
        assert [(pytest.approx(a, abs=1e-3), t) for a, t in want] == [tuple(s) for s in spans]
        text = b.eval(f"{row}.textContent")
        assert "<b>bold</b> &amp; tokens" in text and "detection" in text


@needs_browser
def test_hostile_tokens_and_explanations_are_shown_as_text(autointerp_page):
    pytest.importorskip("websocket", reason="websocket-client (test extra) is missing")
    page, details = autointerp_page
    with Browser(find_chromium()) as b:
        b.open(page.as_uri())
        b.eval("document.querySelector('#sae-table tr[data-key=\"ai|x\"]').click()")
        assert b.eval("typeof window.__pwned") == "undefined"
        markup = "document.querySelectorAll('#panel img, #panel script, #panel b').length"
        assert b.eval(markup) == 0
        for latent, token in ((0, HOSTILE[ord("a")]), (1, HOSTILE[ord("b")])):
            row = f"document.querySelector('#panel .latent[data-latent=\"{latent}\"]')"
            marked = b.eval(f"[...{row}.querySelectorAll('span.on')].map(s => s.textContent)")
            windows = details["latents"][latent]["top_windows"]
            n_active = sum(a > 0 for w in windows for a in w["acts"])
            assert marked == [token] * n_active and n_active > 0
        assert b.console_errors() == []
        assert b.requests() == [page.as_uri()]


def test_hostile_text_never_reaches_the_page_source_raw(autointerp_page):
    page, _ = autointerp_page
    text = page.read_text()
    assert "<script>window.__pwned" not in text and "<img src=x" not in text
    assert re.search(r"\\u003cscript\\u003ewindow.__pwned", text)
