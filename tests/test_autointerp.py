"""The autointerp task: example selection, scoring against closed forms with scripted
judges on a real HTTP server, determinism and the reply cache, and `dictbench run`
end to end (key redaction, skipping when no judge is configured)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from openai_stub_server import Fault, StubJudge
from test_cli import dictbench

from dictbench.data.corpus import keep_positions
from dictbench.data.subject import ByteTokenizer
from dictbench.errors import SpecError
from dictbench.registry import get_task
from dictbench.tasks import autointerp_prompts as prompts
from dictbench.tasks.autointerp import confusion
from dictbench.tasks.autointerp_config import AutointerpOptions, parse_options
from dictbench.tasks.autointerp_examples import select_windows, token_strings
from dictbench.tasks.base import TaskEnv, TaskSkipped

KEY = "sk-autointerp-test-KEY-7f3a9c"

# --- a synthetic world where latent j fires exactly on one byte -------------------------
# Tokens are letters; the activation is one-hot(token) times a random magnitude, and
# latent j is relu(x[letter_j]). So a window activates latent j iff it contains letter_j,
# which a test can count from the token ids alone.
ALPHABET = "abcdefghijklmnopqrst"  # 20 letters: each is in ~2/3 of 21-token windows
LETTERS = "abcdefg"  # latents 0..6, all eligible
DEAD, RARE = "Z", "Q"  # latent 7 never fires; latent 8 fires in 3 windows only
CTX, N_SEQ = 22, 120  # one 21-token window per sequence after BOS


class LetterSAE(torch.nn.Module):
    def __init__(self, letters: str):
        super().__init__()
        self.cols = torch.tensor([ord(c) for c in letters])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, self.cols])


def synthetic_env(options: dict, seed: int = 0) -> TaskEnv:
    rng = np.random.default_rng(1)
    ids = rng.choice([ord(c) for c in ALPHABET], size=(N_SEQ, CTX))
    ids[:, 0] = 256  # BOS
    ids[[3, 40, 77], 5] = ord(RARE)
    acts = np.zeros((N_SEQ, CTX, 257), dtype=np.float32)
    mags = rng.uniform(0.5, 2.0, size=(N_SEQ, CTX)).astype(np.float32)
    np.put_along_axis(acts, ids[..., None], mags[..., None], axis=-1)
    return TaskEnv(
        eval_acts=acts,
        eval_token_ids=ids.astype(np.int32),
        keep_positions=keep_positions(CTX),
        train_mean=np.zeros(257, dtype=np.float32),
        subject=SimpleNamespace(tokenizer=ByteTokenizer()),
        seed=seed,
        options={"autointerp": options},
    )


def contains_by_window(env: TaskEnv, letter: str) -> np.ndarray:
    return (env.eval_token_ids[:, 1:] == ord(letter)).any(axis=1)


# --- scripted judges --------------------------------------------------------------------


def _kind(messages) -> str:
    system = messages[0]["content"]
    if system == prompts.EXPLAIN_SYSTEM:
        return "explain"
    return "fuzzing" if "marked at random" in system else "detection"


def _excerpts(messages) -> list[str]:
    lines = messages[-1]["content"].splitlines()[1:]
    return [re.sub(r"^\d+\. ", "", line) for line in lines]


def _letter(messages) -> str:
    return re.search(r"described as: the letter (.)\n", messages[0]["content"]).group(1)


def perfect_judge(messages) -> str:
    """Explains by the marked letter; detects by containment; fuzzes by the marks."""
    kind, texts = _kind(messages), _excerpts(messages)
    if kind == "explain":
        marked = re.findall(r"<<(.*?)>>", " ".join(texts))
        return "the letter " + max(set(marked), key=marked.count)
    letter = _letter(messages)
    if kind == "detection":
        hits = [i for i, t in enumerate(texts) if letter in t]
    else:
        hits = [i for i, t in enumerate(texts) if set(re.findall(r"<<(.*?)>>", t)) == {letter}]
    return ", ".join(str(i + 1) for i in hits) or "None"


def inverted_judge(messages) -> str:
    reply = perfect_judge(messages)
    if _kind(messages) == "explain":
        return reply
    chosen = set() if reply == "None" else {int(k) for k in reply.split(", ")}
    rest = [k for k in range(1, len(_excerpts(messages)) + 1) if k not in chosen]
    return ", ".join(map(str, rest)) or "None"


def none_judge(messages) -> str:
    return "None" if _kind(messages) != "explain" else perfect_judge(messages)


def options(stub: StubJudge, cache, **kw) -> dict:
    return {
        "model": "stub-model",
        "base_url": stub.url,
        "api_key": KEY,
        "backoff": 0.01,
        "timeout": 5,
        "cache_dir": str(cache),
        **kw,
    }


def run_task(env: TaskEnv, sae=None):
    return get_task("autointerp")().run(sae or LetterSAE(LETTERS + DEAD + RARE), env)


# --- scores against closed forms --------------------------------------------------------


@pytest.mark.parametrize(
    "judge, balanced, accuracy",
    [(perfect_judge, 1.0, 1.0), (inverted_judge, 0.0, 0.0), (none_judge, 0.5, 10 / 14)],
)
def test_detection_scores_match_closed_forms(tmp_path, judge, balanced, accuracy):
    with StubJudge(judge) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=5))
        res = run_task(env)
    m = res.metrics
    assert m["autointerp_n_latents"] == 5
    assert (m["detection_n_scored"], m["detection_n_failed"]) == (5, 0)
    assert m["detection_balanced_accuracy"] == pytest.approx(balanced)
    assert m["detection_balanced_accuracy_std"] == pytest.approx(0.0)
    assert m["detection_accuracy"] == pytest.approx(accuracy)  # SAEBench's 14 = 4 + 10
    assert len(stub.completed()) == 10  # one explanation and one detection per latent
    assert all(r["authorization"] == f"Bearer {KEY}" for r in stub.log)


def test_selection_counts_and_sample_come_from_the_data(tmp_path):
    with StubJudge(perfect_judge) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=100))
        res = run_task(env)
    info = res.details["selection"]
    n_win = {c: int(contains_by_window(env, c).sum()) for c in LETTERS + RARE}
    assert info["n_windows"] == N_SEQ and info["window_tokens"] == 21
    assert info["n_alive"] == len(LETTERS) + 1  # the dead latent is not alive
    assert info["n_too_rare"] == 1 and n_win[RARE] == 3
    assert all(19 <= n_win[c] <= N_SEQ - 10 for c in LETTERS)
    assert info["n_eligible"] == len(LETTERS)
    assert info["sampled_latents"] == list(range(len(LETTERS)))  # n_latents > eligible
    for lat in res.details["latents"]:
        assert lat["explanation"] == f"the letter {LETTERS[lat['latent']]}"
        assert lat["n_active_windows"] == n_win[LETTERS[lat["latent"]]]


def test_fuzzing_scorer(tmp_path):
    with StubJudge(perfect_judge) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=3, scorers=["detection", "fuzzing"]))
        perfect = run_task(env).metrics
    with StubJudge(none_judge) as stub:
        env = synthetic_env(options(stub, tmp_path / "b", n_latents=3, scorers="fuzzing"))
        none = run_task(env).metrics
    assert perfect["fuzzing_balanced_accuracy"] == 1.0 and perfect["fuzzing_n_scored"] == 3
    assert perfect["detection_balanced_accuracy"] == 1.0
    # 4 correctly marked + 4 wrongly marked: answering None is right on half
    assert none["fuzzing_balanced_accuracy"] == 0.5 and none["fuzzing_accuracy"] == 0.5
    assert "detection_balanced_accuracy" not in none


def test_a_fuzzing_set_without_incorrect_examples_is_a_counted_failure(tmp_path):
    """One-token windows leave no unmarked token to mark wrongly, so every wrong window is
    dropped and the set is all correct: balanced accuracy is undefined there."""
    with StubJudge(perfect_judge) as stub:
        opts = options(stub, tmp_path, n_latents=2, window_tokens=1)
        env = synthetic_env({**opts, "scorers": ["detection", "fuzzing"]})
        res = run_task(env)
        n_requests = len(stub.completed())
    m = res.metrics
    assert (m["fuzzing_n_scored"], m["fuzzing_n_failed"]) == (0, 2)
    assert math.isnan(m["fuzzing_balanced_accuracy"])
    assert (m["detection_n_scored"], m["detection_n_failed"]) == (2, 0)
    assert n_requests == 4  # explanation + detection per latent; fuzzing never asked
    for lat in res.details["latents"]:
        assert lat["fuzzing"]["error"].startswith("no incorrect examples")


def test_failed_and_unparseable_replies_are_counted_not_dropped(tmp_path):
    def flaky(messages):
        kind = _kind(messages)
        if kind == "explain":
            letter = perfect_judge(messages)[-1]
            return {"a": "", "b": Fault("500")}.get(letter, perfect_judge(messages))
        return {"c": "I am not sure", "d": "7, 99"}.get(_letter(messages), "None")

    with StubJudge(flaky) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=7, retries=1))
        res = run_task(env)
    m = res.metrics
    # a: empty explanation, b: 500 twice, c: no numbers, d: 99 out of range
    assert (m["detection_n_scored"], m["detection_n_failed"]) == (3, 4)
    assert m["detection_balanced_accuracy"] == 0.5  # the other three answered None
    errors = {LETTERS[lat["latent"]]: lat for lat in res.details["latents"]}
    assert "empty explanation" in errors["a"]["error"]
    assert "HTTP 500" in errors["b"]["error"] and "after 2 attempts" in errors["b"]["error"]
    assert "not a list of excerpt numbers" in errors["c"]["detection"]["error"]
    assert "out of range" in errors["d"]["detection"]["error"]
    assert res.details["judge"]["retries"] == 1


def test_rerun_uses_only_the_cache_and_reproduces_exactly(tmp_path):
    with StubJudge(perfect_judge, script=["429", "500", "slow"], slow_s=1.0) as stub:
        env = synthetic_env(options(stub, tmp_path, n_latents=4, timeout=0.3))
        first = run_task(env)
        n_sent = len(stub.log)
        second = run_task(env)
        assert len(stub.log) == n_sent  # the server saw nothing more
    j1, j2 = first.details["judge"], second.details["judge"]
    assert j1["requests"] == n_sent == 8 + 3 and j1["retries"] == 3
    assert (j2["requests"], j2["cache_hits"], j2["prompt_tokens"]) == (0, 8, 0)
    assert first.metrics == second.metrics
    assert first.details["latents"] == second.details["latents"]


def test_deterministic_given_seed_whatever_the_concurrency(tmp_path):
    def prompts_seen(concurrency, seed, folder):
        with StubJudge(none_judge) as stub:
            env = synthetic_env(
                options(stub, tmp_path / folder, n_latents=3, concurrency=concurrency), seed
            )
            res = run_task(env, LetterSAE(LETTERS * 2))
        return res.details["selection"]["sampled_latents"], sorted(
            json.dumps(r["messages"]) for r in stub.log
        )

    a = prompts_seen(1, 0, "a")
    assert prompts_seen(6, 0, "b") == a
    assert prompts_seen(1, 5, "c") != a


def test_no_judge_configured_is_skipped(tmp_path, monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MY_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TaskSkipped, match="no judge configured"):
        run_task(synthetic_env({}))
    with pytest.raises(TaskSkipped, match="has no API key: set MY_KEY"):
        run_task(synthetic_env({"model": "gpt-4o-mini", "api_key_env": "MY_KEY"}))


def test_key_and_endpoint_from_standard_variables(tmp_path, monkeypatch):
    with StubJudge(none_judge) as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        res = run_task(synthetic_env({"model": "m", "n_latents": 1, "cache_dir": str(tmp_path)}))
    assert res.metrics["detection_n_scored"] == 1
    assert stub.log[0]["authorization"] == f"Bearer {KEY}"
    assert res.details["judge"]["base_url"] == stub.url
    assert KEY not in json.dumps(res.details)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modle": "x"}, "task_options.autointerp.modle: unknown field"),
        ({"scorers": ["simulation"]}, "unknown scorer 'simulation'"),
        ({"n_latents": 0}, "n_latents: must be at least 1"),
        ({"timeout": 0}, "timeout: must be positive"),
        ({"api_key": 123456789}, "api_key: expected a string"),
    ],
)
def test_bad_options_are_spec_errors(raw, message):
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        parse_options(raw)
    assert "123456789" not in str(err.value)


# --- pieces -----------------------------------------------------------------------------


def test_confusion_closed_form():
    labels = [True, True, False, False, False, True]
    c = confusion(labels, {0, 2, 3})
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (1, 2, 1, 2)
    assert c["balanced_accuracy"] == pytest.approx(0.5 * (1 / 3 + 1 / 3))
    assert c["accuracy"] == pytest.approx(2 / 6)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("2, 4", {1, 3}),
        ("None", set()),
        ("none.", set()),
        ("Excerpts: 1 and 3", {0, 2}),
        ("[5, 1]", {0, 4}),
        (" 3 4\n", {2, 3}),
    ],
)
def test_parse_selection(reply, expected):
    assert prompts.parse_selection(reply, 5) == expected


@pytest.mark.parametrize(
    "reply", ["", "maybe", "0", "6", "1, 9", "1. The United States\n2. has been", "2, 4 because"]
)
def test_parse_selection_rejects(reply):
    with pytest.raises(prompts.ReplyError):
        prompts.parse_selection(reply, 5)


def test_render_marks_and_token_strings():
    assert prompts.render([" the", " cat", "\n", " sat"], [False, True, True, False]) == (
        "the <<cat>><< >> sat"
    )

    class SentencePieceLike:  # drops the leading space of a lone word, keeps it inside
        words = {1: "hello", 2: "world", 3: "again"}

        def decode(self, ids):
            return " ".join(self.words[i] for i in ids)

    assert token_strings(SentencePieceLike(), [1, 2, 3]) == ["hello", " world", " again"]
    assert token_strings(ByteTokenizer(), list(b"ab c")) == ["a", "b", " ", "c"]


def test_select_windows_uses_each_window_once_and_respects_ranks():
    rng = np.random.default_rng(0)
    wmax = np.where(rng.random(300) < 0.3, rng.random(300) + 0.1, 0.0)
    counts = dict(n_explain_top=10, n_explain_quantiles=5, n_detect_top=2, n_detect_quantile=2)
    opts = AutointerpOptions(**counts, n_detect_random=10, n_fuzz=4, scorers=["fuzzing"])
    sel = select_windows(wmax, np.random.default_rng(1), opts)
    groups = [sel.explain, sel.detect_pos, sel.detect_neg, sel.fuzz_wrong]
    flat = [w for g in groups for w in g]
    assert len(flat) == len(set(flat)) == 10 + 5 + 2 + 2 + 10 + 4
    by_rank = list(np.argsort(-wmax, kind="stable"))
    assert sel.explain[:10] == by_rank[:10] and sel.detect_pos[:2] == by_rank[10:12]
    assert all(wmax[w] > 0 for w in sel.explain + sel.detect_pos + sel.fuzz_wrong)
    assert all(wmax[w] == 0 for w in sel.detect_neg)
    # one explain example from each fifth of the remaining activating windows, in order
    rest = by_rank[12 : int((wmax > 0).sum())]
    bins = np.array_split(np.arange(len(rest)), 5)
    assert [rest.index(w) in b for w, b in zip(sel.explain[10:], bins, strict=True)] == [True] * 5


# --- `dictbench run` end to end ---------------------------------------------------------


def _cli_judge(messages) -> str:
    """Deterministic from the prompt: explanations name the first marked token; some
    detection replies are unreadable, the rest name the first two excerpts."""
    if _kind(messages) == "explain":
        marked = re.findall(r"<<(.*?)>>", messages[-1]["content"])
        return f"the token {marked[0]!r}" if marked else "nothing"
    if sum(map(ord, messages[-1]["content"])) % 4 == 0:
        return "I cannot tell."
    return "1, 2"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_spec_factory):
    base = tmp_path_factory.mktemp("autointerp_cli")
    with StubJudge(_cli_judge, script=["429", "500"]) as stub:
        spec = tiny_spec_factory(base / "cache")
        spec["tasks"] = ["sparsity", "autointerp"]
        spec["eval"]["tokens"] = 2048
        spec["task_options"] = {
            "autointerp": {
                "model": "stub-model",
                "base_url": stub.url,
                "api_key": KEY,
                "n_latents": 8,
                "backoff": 0.01,
                "window_tokens": 5,
                "n_explain_top": 3,
                "n_explain_quantiles": 2,
                "n_detect_top": 1,
                "n_detect_quantile": 1,
                "n_detect_random": 4,
            }
        }
        path = base / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        res = dictbench("run", str(path), "--out", str(base / "out1"), cache=base / "env")
        runs, logs = [(base / "out1", res)], [list(stub.log)]
        # The rerun goes in process (a second CLI start would only re-import torch); it
        # shares nothing with the first but the files on disk.
        from dictbench import runner
        from dictbench import spec as specmod

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runner.run(specmod.resolve(str(path), None, [f"out={base / 'out2'}"]))
        runs.append(
            (
                base / "out2",
                SimpleNamespace(returncode=0, stdout=out.getvalue(), stderr=err.getvalue()),
            )
        )
        logs.append(list(stub.log))
    return base, runs, logs


def test_cli_scores_with_the_real_client_and_reruns_from_cache(cli_runs):
    base, runs, logs = cli_runs
    for _, res in runs:
        assert res.returncode == 0, res.stderr[-3000:]
    assert [r["fault"] for r in logs[0][:2]] == ["429", "500"]
    assert logs[1] == logs[0]  # the second run sent nothing
    recs = [json.loads((out / "results/l1/autointerp.json").read_text()) for out, _ in runs]
    m, d = recs[0]["metrics"], recs[0]["details"]
    assert m["autointerp_n_latents"] == 8 == len(d["latents"])
    scored = [lat["detection"] for lat in d["latents"] if "tp" in lat.get("detection", {})]
    assert m["detection_n_scored"] == len(scored) and m["detection_n_failed"] == 8 - len(scored)
    assert 0 < len(scored) < 8  # some replies were unreadable by construction
    recomputed = [
        0.5 * (s["tp"] / (s["tp"] + s["fn"]) + s["tn"] / (s["tn"] + s["fp"])) for s in scored
    ]
    assert m["detection_balanced_accuracy"] == pytest.approx(np.mean(recomputed))
    assert d["judge"]["requests"] == len(logs[0]) and d["judge"]["retries"] == 2
    assert recs[1]["details"]["judge"]["requests"] == 0
    assert recs[1]["details"]["judge"]["cache_hits"] == len(logs[0]) - 2
    assert recs[1]["metrics"] == m and recs[1]["details"]["latents"] == d["latents"]
    out = runs[0][1].stdout
    assert "autointerp (stub-model): detection" in out and "cache hits" in out


def test_cli_never_writes_the_key(cli_runs):
    base, runs, logs = cli_runs
    assert logs[0][0]["authorization"] == f"Bearer {KEY}"  # it was used
    written = [p for p in base.rglob("*") if p.is_file() and p.name != "spec.yaml"]
    assert any(p.name == "run.json" for p in written)
    assert any("judge" in p.parts for p in written)  # the reply cache is scanned too
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    for _, res in runs:
        assert KEY not in res.stdout + res.stderr
    run = json.loads((base / "out1/run.json").read_text())
    assert run["spec"]["task_options"]["autointerp"]["api_key"] == "<redacted>"


def test_run_without_a_judge_skips_in_one_line(tmp_path, tiny_spec_data, monkeypatch, capsys):
    """In process (the subprocess path is covered above): saves a model-loading start."""
    from dictbench import runner, spec

    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    data = {**tiny_spec_data, "tasks": ["sparsity", "autointerp"], "out": str(tmp_path / "out")}
    resolved = spec.build(spec.RunSpec, data)
    spec.validate(resolved)
    out = runner.run(resolved)
    lines = [line for line in capsys.readouterr().out.splitlines() if "autointerp" in line]
    assert len(lines) == 2 and "skipping task autointerp for l1: no judge configured" in lines[1]
    assert (out / "results/l1/sparsity.json").is_file()
    assert not (out / "results/l1/autointerp.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
