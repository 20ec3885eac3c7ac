"""Feature absorption on first-letter spelling (Chanin et al. 2024, as in SAEBench).

Prompts come from the model's own vocabulary (alphabetic tokens with a leading space),
each after a few in-context examples such as `` tiger has the first letter: T``. A
26-way logistic-regression probe on the hook activations at the word token is the
ground truth. Each letter's main latents are found by k-sparse probing (one more latent
is kept while it raises F1 by more than the feature-split threshold). On held-out words
the probe gets right, a word is *absorbed* when no main latent fires while a latent whose
decoder row is aligned with the probe direction does; *full* absorption also needs that
latent to carry at least 40% of the probe projection; the absorption *fraction* is the
share of the reconstruction's projection on the probe direction that the main latents
do not account for. Lower is better for all three
(SAEBench's JSON is lower-is-better; its paper plots 1 - x).

Where we differ from SAEBench: the probe is scikit-learn's standardised multinomial
logistic regression, not a torch-trained one; main latents are ranked by class-mean
difference (as in our sparse probing) rather than by a probe's weights; prompts are cut
at the word token, since a causal model's activation there never sees the rest. A small
model may spell poorly: when the probe's accuracy is below ``probe_floor`` the rates are
NaN and ``details.weak_model`` is true.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from dictbench.data.corpus import in_eval_split
from dictbench.errors import UserError
from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks import absorption_core as core
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TaskSkipped

OPT = "task_options.absorption"
DEFAULTS: dict[str, Any] = {
    "max_words": 1000,
    "words": None,  # an explicit word list instead of the vocabulary
    "n_icl": 3,
    "test_fraction": 0.3,
    "min_words_per_letter": 8,
    "probe_floor": 0.6,
    "max_k": 10,
    "split_threshold": 0.03,
    "cos_threshold": 0.025,
    "full_fraction": 0.4,
}


def options_with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"{OPT}: unknown option '{unknown[0]}' (known: {', '.join(DEFAULTS)})")
    opts = {**DEFAULTS, **options}
    for key in ("max_words", "n_icl", "min_words_per_letter", "max_k"):
        if not isinstance(opts[key], int) or opts[key] < (0 if key == "n_icl" else 1):
            raise UserError(f"{OPT}.{key}: a positive integer, got {opts[key]!r}")
    for key in (
        "test_fraction",
        "probe_floor",
        "split_threshold",
        "cos_threshold",
        "full_fraction",
    ):
        v = opts[key]
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise UserError(f"{OPT}.{key}: a number in [0, 1), got {v!r}")
    words = opts["words"]
    if words is not None:
        if not isinstance(words, list) or not all(
            isinstance(w, str) and w.isalpha() for w in words
        ):
            raise UserError(f"{OPT}.words: a list of alphabetic words")
    return opts


def vocab_words(tokenizer: Any) -> list[tuple[str, int]]:
    """(word, token id) for tokens that decode to a space and 2+ ASCII letters."""
    out = []
    for i in range(int(getattr(tokenizer, "vocab_size", 0))):
        s = tokenizer.decode([i])
        if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha():
            out.append((s[1:], i))
    return out


def build_prompts(
    tokenizer: Any, opts: dict[str, Any], seed: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """Token ids of each prompt (ending at the word), its letter index, and the split."""
    if opts["words"] is not None:
        pairs = [(w, None) for w in dict.fromkeys(opts["words"])]
    else:
        pairs = vocab_words(tokenizer)
    rng = np.random.default_rng([seed, 26])
    if len(pairs) > opts["max_words"]:
        pairs = [pairs[i] for i in np.sort(rng.permutation(len(pairs))[: opts["max_words"]])]
    letters = np.asarray([core.LETTERS.index(w[0].lower()) for w, _ in pairs], dtype=np.int64)
    counts = np.bincount(letters, minlength=26)
    keep = counts[letters] >= opts["min_words_per_letter"]
    pairs = [p for p, k in zip(pairs, keep, strict=True) if k]
    letters = letters[keep]
    if len(set(letters.tolist())) < 2:
        raise TaskSkipped(
            f"absorption: fewer than 2 letters have {opts['min_words_per_letter']} words"
        )
    is_test = np.asarray(
        [in_eval_split(i, seed + 104729, opts["test_fraction"]) for i in range(len(pairs))]
    )
    train_words = [w for (w, _), t in zip(pairs, is_test, strict=True) if not t]
    bos = tokenizer.bos_token_id
    prompts = []
    for word, tok_id in pairs:
        icl = [train_words[j] for j in rng.permutation(len(train_words))[: opts["n_icl"]]]
        prefix = "".join(f" {w} has the first letter: {w[0].upper()}\n" for w in icl)
        ids = tokenizer.encode(prefix) + (
            [tok_id] if tok_id is not None else tokenizer.encode(f" {word}")
        )
        prompts.append(np.asarray(([bos] if bos is not None else []) + ids, dtype=np.int64))
    return prompts, letters, is_test, [w for w, _ in pairs]


@torch.no_grad()
def word_activations(env: TaskEnv, prompts: list[np.ndarray]) -> np.ndarray:
    """[n, d] float32 hook activations at each prompt's last (word) token."""
    out = []
    per_batch = max(1, env.batch_tokens // max(len(p) for p in prompts))
    for s in range(0, len(prompts), per_batch):
        block = prompts[s : s + per_batch]
        width = max(len(p) for p in block)
        ids = torch.stack(
            [torch.from_numpy(np.pad(p, (0, width - len(p)), mode="edge")) for p in block]
        )
        acts = env.subject.run_to(env.hook, ids).float().cpu().numpy()
        out.extend(acts[i, len(p) - 1] for i, p in enumerate(block))
    return np.stack(out).astype(np.float32)


def _lower(name: str, headline: bool, doc: str) -> Metric:
    return Metric(name, "lower", abs_tol=0.02, headline=headline, doc=doc)


@register_task
class Absorption(Task):
    name = "absorption"
    needs_subject = True
    metrics: ClassVar[tuple[Metric, ...]] = (
        _lower(
            "absorption_rate",
            True,
            "held-out words whose main letter latents are silent while an aligned one fires",
        ),
        _lower(
            "full_absorption_rate",
            False,
            "same, with the absorbing latent carrying >= 40% of the probe projection",
        ),
        _lower(
            "mean_absorption_fraction",
            True,
            "share of the probe-direction reconstruction carried by non-main latents",
        ),
        Metric(
            "probe_accuracy",
            "equal",
            abs_tol=0.02,
            gate=False,
            doc="26-way first-letter probe accuracy (does not depend on the SAE)",
        ),
        Metric("mean_main_latents", "equal", gate=False, doc="main latents per letter"),
        Metric("n_letters", "equal", gate=False, doc="letters scored"),
    )

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, seed: int = 0) -> None:
        """Check this task's options before any training or scoring (UserError if bad)."""
        options_with_defaults(dict(options or {}))

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        if env.subject is None or getattr(env.subject, "tokenizer", None) is None:
            raise TaskSkipped("needs the subject model to build spelling prompts")
        opts = options_with_defaults(env.task_options(self.name))
        key = ("absorption.words", env.hook, repr(sorted(opts.items())))
        if key not in env.shared:
            prompts, y, is_test, words = build_prompts(env.subject.tokenizer, opts, env.seed)
            x = word_activations(env, prompts)
            truth = core.fit_ground_truth(x, y, is_test, env.seed)
            env.shared[key] = (x, y, is_test, truth, len(words))
        x, y, is_test, truth, n_words = env.shared[key]
        return score(sae, core.WordSet(x, y, is_test), truth, opts, env, n_words)


def score(
    sae: torch.nn.Module,
    words: core.WordSet,
    truth: core.GroundTruth,
    opts: dict[str, Any],
    env: TaskEnv,
    n_words: int,
) -> TaskResult:
    """The record for one SAE: means over letters, NaN when the probe is below the floor."""
    params = core.AbsorptionParams(
        opts["max_k"], opts["split_threshold"], opts["cos_threshold"], opts["full_fraction"]
    )
    per_letter = core.measure(sae, words, truth, params, env.seed, env.device)
    summary = core.summarise(per_letter)
    weak = truth.accuracy < opts["probe_floor"]
    metrics = dict(summary)
    metrics["probe_accuracy"] = truth.accuracy
    details: dict[str, Any] = {
        "weak_model": weak,
        "probe_floor": opts["probe_floor"],
        "n_words": n_words,
        "n_test_words": int(words.is_test.sum()),
        "per_letter": per_letter,
    }
    if weak:
        details["unguarded"] = {
            k: summary[k]
            for k in ("absorption_rate", "full_absorption_rate", "mean_absorption_fraction")
        }
        for k in details["unguarded"]:
            metrics[k] = float("nan")
    return TaskResult(metrics, details, eval_tokens=int(len(words.x)))
