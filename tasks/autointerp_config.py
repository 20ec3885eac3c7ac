"""Options of the autointerp task (``task_options.autointerp`` in a run spec).

Checked when the spec is validated, so a typo fails the run before training rather
than after it. The API key may be given here, but the preferred place is an
environment variable (``api_key_env``, default OPENAI_API_KEY): a key in the spec is
redacted from run.json, and no message here ever repeats it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dictbench.data.cache import default_cache_root
from dictbench.errors import SpecError
from dictbench.score.judge import JudgeSettings
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskSkipped

SCORERS = ("detection", "fuzzing")


def _scorer_metrics(s: str) -> tuple[Metric, ...]:
    # A mean over ~100 latents of a judge model's sampled answers moves by a few
    # hundredths between judges or prompt caches; a latent or two more or less scored is
    # the judge's flakiness, not the SAE's; the spread over latents is reported, not gated.
    return (
        Metric(f"{s}_balanced_accuracy", "higher", abs_tol=0.05, headline=s == "detection"),
        Metric(f"{s}_accuracy", "higher", abs_tol=0.05),
        Metric(f"{s}_n_scored", "higher", abs_tol=2.0),
        Metric(f"{s}_n_failed", "lower", abs_tol=2.0),
        Metric(f"{s}_balanced_accuracy_std", "equal", gate=False),
        Metric(f"{s}_accuracy_std", "equal", gate=False),
    )


# What the autointerp task writes (``Autointerp.metrics``).
AUTOINTERP_METRICS: tuple[Metric, ...] = (
    *(m for s in SCORERS for m in _scorer_metrics(s)),
    Metric("autointerp_n_latents", "equal"),
)
WHERE = "task_options.autointerp"


@dataclass
class AutointerpOptions:
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = "OPENAI_API_KEY"
    n_latents: int = 100
    scorers: list[str] = field(default_factory=lambda: ["detection"])
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0
    breaker_after: int = 5  # connection failures in a row before the judge is given up on
    cache_dir: str | None = None
    # example windows (METRICS.md; defaults follow SAEBench's 10 + 5 explain, 4 + 10 detect)
    window_tokens: int = 21
    n_explain_top: int = 10
    n_explain_quantiles: int = 5
    n_detect_top: int = 2
    n_detect_quantile: int = 2
    n_detect_random: int = 10
    n_fuzz: int = 4
    # top explain windows kept in the record, with token activations, for the leaderboard
    # page (0: none); bounded because every latent's windows go into autointerp.json
    record_windows: int = 5
    # sampling
    temperature: float = 0.0
    explain_max_tokens: int = 60
    score_max_tokens: int = 40
    max_tokens: int | None = None  # held-out tokens scanned for examples (default: all)

    @property
    def fuzz_windows(self) -> int:
        """Activating windows held out for fuzzing: none unless fuzzing is a scorer."""
        return self.n_fuzz if "fuzzing" in self.scorers else 0

    @property
    def needed_active(self) -> int:
        return (
            self.n_explain_top
            + self.n_explain_quantiles
            + self.n_detect_top
            + self.n_detect_quantile
            + self.fuzz_windows
        )

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "api_key"}


_AT_LEAST = {
    "n_latents": 1,
    "concurrency": 1,
    "retries": 0,
    "breaker_after": 0,
    "window_tokens": 1,
    "n_explain_top": 1,
    "n_explain_quantiles": 0,
    "n_detect_top": 0,
    "n_detect_quantile": 0,
    "n_detect_random": 1,
    "n_fuzz": 1,
    "record_windows": 0,
    "explain_max_tokens": 1,
    "score_max_tokens": 1,
}


def parse_options(raw: dict[str, Any]) -> AutointerpOptions:
    from dictbench.spec import build

    data = dict(raw)
    if "api_key" in data and data["api_key"] is not None and not isinstance(data["api_key"], str):
        raise SpecError(f"{WHERE}.api_key: expected a string")  # never echo a key
    if isinstance(data.get("scorers"), str):
        data["scorers"] = [data["scorers"]]
    opts: AutointerpOptions = build(AutointerpOptions, data, WHERE)
    for name, low in _AT_LEAST.items():
        if getattr(opts, name) < low:
            raise SpecError(f"{WHERE}.{name}: must be at least {low}, got {getattr(opts, name)}")
    for name in ("timeout", "backoff", "temperature"):
        if getattr(opts, name) < 0 or (name == "timeout" and opts.timeout == 0):
            raise SpecError(f"{WHERE}.{name}: must be positive, got {getattr(opts, name)}")
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise SpecError(f"{WHERE}.max_tokens: must be positive, got {opts.max_tokens}")
    if opts.n_detect_top + opts.n_detect_quantile < 1:
        raise SpecError(f"{WHERE}.n_detect_top + n_detect_quantile: must be at least 1")
    if not opts.scorers:
        raise SpecError(f"{WHERE}.scorers: at least one of {', '.join(SCORERS)}")
    for s in opts.scorers:
        if s not in SCORERS:
            raise SpecError(f"{WHERE}.scorers: unknown scorer '{s}' (known: {', '.join(SCORERS)})")
    if len(set(opts.scorers)) != len(opts.scorers):
        raise SpecError(f"{WHERE}.scorers: a scorer is listed twice")
    return opts


def judge_settings(opts: AutointerpOptions) -> JudgeSettings:
    """Where the judge is, from the options and the standard OpenAI variables; raises
    ``TaskSkipped`` when no judge is configured."""
    if not opts.model:
        raise TaskSkipped(
            f"no judge configured (set {WHERE}.model, plus base_url or OPENAI_BASE_URL for a "
            "local or other OpenAI-compatible server, or OPENAI_API_KEY for OpenAI)"
        )
    base_url = opts.base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = opts.api_key or os.environ.get(opts.api_key_env) or None
    if key is None and base_url is None:
        raise TaskSkipped(
            f"judge '{opts.model}' has no API key: set {opts.api_key_env} "
            f"(or {WHERE}.base_url for a server that needs none)"
        )
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_root() / "judge"
    return JudgeSettings(
        model=opts.model,
        base_url=base_url,
        api_key=key,
        concurrency=opts.concurrency,
        timeout_s=opts.timeout,
        max_retries=opts.retries,
        backoff_s=opts.backoff,
        breaker_after=opts.breaker_after,
        cache_dir=cache,
    )
