"""Auto-interpretability: can an LLM judge explain a latent and then recognise it?

For a seeded sample of alive latents the judge writes an explanation from marked
examples, then classifies held-out windows it has not seen (detection: which windows
activate; fuzzing, Paulo et al. 2024: which windows are marked correctly). The score
per latent is balanced accuracy, so chance is 0.5 whatever the class mix; plain
accuracy is reported too because that is SAEBench's number. A latent whose judge
reply failed or could not be read counts as failed for that scorer: every sampled
latent ends up either scored or failed, and both counts are reported.

Each latent's entry in the record keeps its top few explain windows (token strings and
the latent's activation per token), so that a reader of the results, the leaderboard
page among them, sees what an explanation was written from without rerunning anything.

The judge stage is the only slow part on a real endpoint, so it runs concurrently
(``bench/score/judge.py``); everything before it is a pure function of the SAE, the
held-out data and the seed, which is what makes the reply cache hit on a rerun.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dictbench.errors import SpecError
from dictbench.registry import register_task
from dictbench.score.judge import Judge, JudgeSettings
from dictbench.tasks import autointerp_prompts as prompts
from dictbench.tasks.autointerp_config import (
    AUTOINTERP_METRICS,
    AutointerpOptions,
    judge_settings,
    parse_options,
)
from dictbench.tasks.autointerp_examples import (
    WindowScanner,
    latent_rng,
    make_layout,
    select_windows,
    token_strings,
    true_marks,
    wrong_marks,
)
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TaskSkipped

STREAM_SAMPLE, STREAM_SELECT, STREAM_DETECT, STREAM_FUZZ = 0, 1, 2, 3


@dataclass
class LatentItem:
    """Everything the judge will be shown for one latent, fixed before any request."""

    latent: int
    n_active_windows: int
    explain: list[str]
    scoring: dict[str, tuple[list[str], list[bool]]]  # scorer -> (excerpts, is_positive)
    # The first explain windows (the top ones) as the record keeps them: {"tokens", "acts"}.
    windows: list[dict[str, list]]


def _excerpt(tokenizer: Any, ids: np.ndarray, marks: np.ndarray | None = None) -> str:
    return prompts.render(token_strings(tokenizer, ids), marks)


def _shuffled(rng: np.random.Generator, texts: list[str], labels: list[bool]):
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [labels[i] for i in order]


def prepare_latents(sae: torch.nn.Module, env: TaskEnv, opts: AutointerpOptions):
    """Sample latents and build their example sets: (items, selection details, tokens)."""
    layout = make_layout(
        env.keep_positions, env.eval_acts.shape[0], opts.window_tokens, opts.max_tokens
    )
    scan = WindowScanner(sae, env.eval_acts, layout, env.device, env.batch_tokens)
    counts = scan.active_window_counts()
    enough_pos = counts >= opts.needed_active
    enough_neg = layout.n_windows - counts >= opts.n_detect_random
    eligible = np.flatnonzero(enough_pos & enough_neg)
    rng = latent_rng(env.seed, 0, STREAM_SAMPLE)
    n = min(opts.n_latents, len(eligible))
    sampled = np.sort(rng.choice(eligible, n, replace=False)) if n else np.zeros(0, np.int64)
    info = {
        "window_tokens": int(layout.positions.shape[1]),
        "n_windows": layout.n_windows,
        "n_alive": int((counts > 0).sum()),
        "n_eligible": int(len(eligible)),
        "n_too_rare": int(((counts > 0) & ~enough_pos).sum()),
        "n_too_dense": int((enough_pos & ~enough_neg).sum()),
        "needed_active_windows": opts.needed_active,
        "sampled_latents": sampled.tolist(),
    }
    wmax = scan.window_max(sampled) if n else None
    tok = env.subject.tokenizer
    items = []
    for j, latent in enumerate(sampled.tolist()):
        sel = select_windows(wmax[:, j], latent_rng(env.seed, latent, STREAM_SELECT), opts)
        explain, windows = _explain_set(scan, env, tok, latent, sel.explain, opts)
        pos_ids = scan.token_ids(env.eval_token_ids, sel.detect_pos)
        neg_ids = scan.token_ids(env.eval_token_ids, sel.detect_neg)
        texts = [_excerpt(tok, i) for i in pos_ids] + [_excerpt(tok, i) for i in neg_ids]
        labels = [True] * len(pos_ids) + [False] * len(neg_ids)
        scoring = {
            "detection": _shuffled(latent_rng(env.seed, latent, STREAM_DETECT), texts, labels)
        }
        if "fuzzing" in opts.scorers:
            scoring["fuzzing"] = _fuzz_set(scan, env, tok, latent, sel, pos_ids)
        items.append(LatentItem(latent, int(counts[latent]), explain, scoring, windows))
    return items, info, layout.n_tokens


def _explain_set(scan, env, tok, latent: int, chosen: list[int], opts: AutointerpOptions):
    """The marked excerpts the explainer is shown, and the top ``record_windows`` of them
    as records: each window's token strings (the very pieces the excerpt was rendered
    from) and the latent's activation on each token, to 4 significant digits."""
    ids = scan.token_ids(env.eval_token_ids, chosen)
    acts = scan.token_acts(chosen, latent)
    pieces = [token_strings(tok, i) for i in ids]
    explain = [prompts.render(p, true_marks(a)) for p, a in zip(pieces, acts, strict=True)]
    n_keep = min(opts.record_windows, opts.n_explain_top, len(chosen))
    windows = [
        {"tokens": pieces[k], "acts": [float(f"{float(a):.4g}") for a in acts[k]]}
        for k in range(n_keep)
    ]
    return explain, windows


def _fuzz_set(scan, env, tok, latent, sel, pos_ids):
    """Held-out activating windows marked where the latent fires (correct) and others
    marked on tokens where it does not (incorrect)."""
    rng = latent_rng(env.seed, latent, STREAM_FUZZ)
    pos_acts = scan.token_acts(sel.detect_pos, latent)
    texts = [_excerpt(tok, i, true_marks(a)) for i, a in zip(pos_ids, pos_acts, strict=True)]
    labels = [True] * len(texts)
    wrong_ids = scan.token_ids(env.eval_token_ids, sel.fuzz_wrong)
    for ids, acts in zip(wrong_ids, scan.token_acts(sel.fuzz_wrong, latent), strict=True):
        marks = wrong_marks(acts, rng)
        if marks is not None:
            texts.append(_excerpt(tok, ids, marks))
            labels.append(False)
    return _shuffled(rng, texts, labels)


async def _score_latent(judge: Judge, item: LatentItem, opts: AutointerpOptions) -> dict:
    out: dict[str, Any] = {"latent": item.latent, "n_active_windows": item.n_active_windows}
    if item.windows:  # kept whether or not the judge answers: what the latent fires on
        out["top_windows"] = item.windows
    reply = await judge.chat(
        prompts.explain_messages(item.explain),
        temperature=opts.temperature,
        max_tokens=opts.explain_max_tokens,
    )
    try:
        if not reply.ok:
            raise prompts.ReplyError(reply.error)
        out["explanation"] = prompts.parse_explanation(reply.content or "")
    except prompts.ReplyError as e:
        out["error"] = f"explain: {e}"
        return out

    async def score(kind: str) -> dict[str, Any]:
        texts, labels = item.scoring[kind]
        if all(labels) or not any(labels):
            # Balanced accuracy needs both classes (fuzzing drops a wrong window that has
            # no unmarked token to mark): a failure to count, not a division by zero.
            missing = "incorrect" if all(labels) else "correct"
            return {"error": f"no {missing} examples to score ({len(labels)} in the set)"}
        r = await judge.chat(
            prompts.score_messages(kind, out["explanation"], texts),
            temperature=opts.temperature,
            max_tokens=opts.score_max_tokens,
        )
        if not r.ok:
            return {"error": r.error}
        try:
            chosen = prompts.parse_selection(r.content or "", len(texts))
        except prompts.ReplyError as e:
            return {"error": str(e), "reply": (r.content or "")[:200]}
        return {**confusion(labels, chosen), "reply": (r.content or "")[:200]}

    results = await asyncio.gather(*(score(kind) for kind in opts.scorers))
    out.update(zip(opts.scorers, results, strict=True))
    return out


def confusion(labels: list[bool], chosen: set[int]) -> dict[str, Any]:
    tp = sum(1 for i, y in enumerate(labels) if y and i in chosen)
    fp = sum(1 for i, y in enumerate(labels) if not y and i in chosen)
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    tn, fn = n_neg - fp, n_pos - tp
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "balanced_accuracy": 0.5 * (tp / n_pos + tn / n_neg),
        "accuracy": (tp + tn) / len(labels),
    }


async def _judge_all(settings: JudgeSettings, items: list[LatentItem], opts: AutointerpOptions):
    bar = tqdm(total=len(items), desc="autointerp judge", unit="latent", mininterval=1.0)

    async def one(judge: Judge, item: LatentItem) -> dict:
        res = await _score_latent(judge, item, opts)
        bar.update(1)
        return res

    try:
        async with Judge(settings) as judge:
            results = await asyncio.gather(*(one(judge, item) for item in items))
            return results, judge.stats
    finally:
        bar.close()


def _run_async(coro: Any) -> Any:
    """asyncio.run, also from a thread that already has a loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def summarize(results: list[dict], scorers: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = {"autointerp_n_latents": float(len(results))}
    for kind in scorers:
        scored = [r[kind] for r in results if "balanced_accuracy" in r.get(kind, {})]
        for name in ("balanced_accuracy", "accuracy"):
            vals = np.array([s[name] for s in scored], dtype=np.float64)
            metrics[f"{kind}_{name}"] = float(vals.mean()) if len(vals) else float("nan")
            metrics[f"{kind}_{name}_std"] = float(vals.std()) if len(vals) else float("nan")
        metrics[f"{kind}_n_scored"] = float(len(scored))
        metrics[f"{kind}_n_failed"] = float(len(results) - len(scored))
    return metrics


@register_task
class Autointerp(Task):
    name = "autointerp"
    needs_subject = True
    report_order = 70
    metrics = AUTOINTERP_METRICS

    @staticmethod
    def validate_options(raw: dict[str, Any]) -> None:
        parse_options(raw)

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        try:
            opts = parse_options(env.task_options(self.name))
        except SpecError as e:
            raise TaskSkipped(str(e)) from e
        settings = judge_settings(opts)
        if env.subject is None or getattr(env.subject, "tokenizer", None) is None:
            raise TaskSkipped("needs the subject model's tokenizer to show text to the judge")
        items, info, n_tokens = prepare_latents(sae, env, opts)
        t = time.perf_counter()
        results, stats = _run_async(_judge_all(settings, items, opts)) if items else ([], None)
        wall = time.perf_counter() - t
        metrics = summarize(results, opts.scorers)
        judge = {**settings.public(), "wall_seconds": wall, **(stats.__dict__ if stats else {})}
        print(_summary_line(metrics, judge, opts.scorers, info), flush=True)
        options = {k: v for k, v in opts.public().items() if k not in ("base_url", "model")}
        details = {"judge": judge, "options": options, "selection": info, "latents": results}
        return TaskResult(metrics=metrics, details=details, eval_tokens=n_tokens)


def _summary_line(metrics: dict, judge: dict, scorers: list[str], info: dict) -> str:
    if not metrics["autointerp_n_latents"]:
        return (
            f"autointerp: no latent has {info['needed_active_windows']} activating and enough "
            f"non-activating windows among {info['n_windows']} (alive: {info['n_alive']})"
        )
    parts = [
        f"{k} {metrics[f'{k}_balanced_accuracy']:.3f}"
        f" +- {metrics[f'{k}_balanced_accuracy_std']:.3f}"
        f" ({metrics[f'{k}_n_scored']:.0f} scored, {metrics[f'{k}_n_failed']:.0f} failed)"
        for k in scorers
    ]
    return (
        f"autointerp ({judge['model']}): "
        + "; ".join(parts)
        + f"; {judge['requests']} requests ({judge['retries']} retries), "
        f"{judge['cache_hits']} cache hits, {judge['prompt_tokens']} prompt + "
        f"{judge['completion_tokens']} completion tokens, judge {judge['wall_seconds']:.1f} s"
    )
