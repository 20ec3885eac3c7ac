"""Downstream fidelity: next-token cross-entropy with the SAE spliced into the model.

The hook-point activations of the evaluation sequences are already in the cache,
so the layers before the hook never run again: only the layers after the hook run,
on the clean activations, on each SAE's spliced ones, and on the zero- and
mean-ablated ones. Only the spliced pass depends on the SAE, so the others are
shared:

* the zero- and mean-ablated losses are two numbers per window, computed once per
  environment (``env.shared``; ``dictbench.score.eval_shared`` also keeps them on disk).
  An ablated window depends only on its special positions' activations, so windows
  that share them (every BOS-led window) share one ablated pass;
* the clean pass gives the full next-token distributions the KL needs, far too big to
  keep for a whole window (tokens x vocabulary floats), so it is shared per batch:
  ``run_many`` takes every SAE of a group, runs the clean pass once per batch and each
  SAE's spliced pass after it. Each pass has the batch shape it has alone, so an SAE
  scored in a group gets exactly (bit for bit) the numbers it gets alone.

Special positions (position 0) keep their original activation in every variant, and
predictions made *at* position 0 are not averaged: they cannot change, and would only
dilute the differences.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dictbench.registry import register_task
from dictbench.score.divergence import kl_by_position
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import Task, TaskEnv, TaskResult


def _batches(
    env: TaskEnv, n_seq: int, seqs_per_batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, n_seq, seqs_per_batch):
        stop = min(n_seq, start + seqs_per_batch)
        x = torch.tensor(np.asarray(env.eval_acts[start:stop]), dtype=torch.float32)
        ids = torch.from_numpy(np.asarray(env.eval_token_ids[start:stop])).long()
        yield x.to(env.device), ids


def _pred_logprobs(env: TaskEnv, stacked: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(next token) for predictions from positions 1..t-2 (targets 2..t-1)."""
    n_var = stacked.shape[0] // ids.shape[0]
    logits = env.subject.run_from(env.hook, stacked, ids.repeat(n_var, 1))
    return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)


def _target_nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood per variant, float64, shape [n_variants]."""
    n_var = logp.shape[0] // ids.shape[0]
    targets = ids[:, 2:].to(logp.device).repeat(n_var, 1)
    tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -tok_lp.reshape(n_var, -1).double().sum(-1).cpu()


def clean_pass(env: TaskEnv, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The unmodified model's next-token log-probs for one batch: the part of every
    SAE's score that does not depend on the SAE, run once per batch for a group."""
    return _pred_logprobs(env, x, ids)


def _splice(sae: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The batch with the SAE's reconstruction at the kept positions only."""
    b, _, d = x.shape
    x_hat = x.clone()
    x_hat[:, keep] = sae(x[:, keep].reshape(-1, d)).reshape(b, int(keep.sum()), d).to(x.dtype)
    return x_hat


def _ablation_groups(env: TaskEnv, n_seq: int) -> list[list[int]]:
    """The windows grouped by their activations at the special positions, in order.

    An ablated window is those activations plus one constant at every other position,
    and ``run_from`` reads only activations (its token ids give shapes and positions),
    so every window of a group has the same ablated logits: one pass per group, not per
    window. Windows that all start with BOS make one group. Only the special positions
    are read: a few KB per window, not the whole window."""
    special_acts = np.asarray(env.eval_acts[:n_seq][:, ~env.keep_positions])
    groups: dict[bytes, list[int]] = {}
    for i in range(n_seq):
        key = np.ascontiguousarray(special_acts[i]).tobytes()
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _groups_nll(env: TaskEnv, groups: list[list[int]], mean: torch.Tensor) -> torch.Tensor:
    """Summed (zero, mean) NLL over every window of these groups: each group's ablated
    log-probs, from its first window, scored against each member's own targets."""
    keep = torch.from_numpy(env.keep_positions)
    firsts = [members[0] for members in groups]
    x = torch.tensor(np.asarray(env.eval_acts[firsts]), dtype=torch.float32).to(env.device)
    zero = x.clone()
    zero[:, keep] = 0.0
    mean_abl = x.clone()
    mean_abl[:, keep] = mean
    ids = torch.from_numpy(np.asarray(env.eval_token_ids[firsts])).long()
    logp = _pred_logprobs(env, torch.cat([zero, mean_abl]), ids)  # [2 x groups, pos, vocab]
    logp = logp.reshape(2, len(groups), *logp.shape[1:])
    nll = torch.zeros(2, dtype=torch.float64)
    for j, members in enumerate(groups):
        targets = torch.from_numpy(np.asarray(env.eval_token_ids[members])[:, 2:]).long()
        pos = torch.arange(targets.shape[1]).unsqueeze(0)
        tok_lp = logp[:, j][:, pos, targets.to(logp.device)]  # [2, members, positions]
        nll -= tok_lp.double().sum((1, 2)).cpu()
    return nll


@torch.no_grad()
def ablation_losses(env: TaskEnv, n_seq: int, seqs_per_batch: int) -> tuple[float, float]:
    """(ce_zero, ce_mean) over the first n_seq sequences; memoised per run. One ablated
    pass per group of windows that share their special positions' activations
    (:func:`_ablation_groups`), seqs_per_batch groups at a time: for BOS-led windows,
    one pass of one window in all."""
    key = ("downstream.ablation", n_seq)
    if key in env.shared:
        return env.shared[key]
    mean = torch.from_numpy(np.asarray(env.train_mean, dtype=np.float32)).to(env.device)
    groups = _ablation_groups(env, n_seq)
    nll = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(groups), seqs_per_batch):
        nll += _groups_nll(env, groups[start : start + seqs_per_batch], mean)
    n_pred = n_seq * (env.eval_token_ids.shape[1] - 2)
    result = (float(nll[0]) / n_pred, float(nll[1]) / n_pred)
    env.shared[key] = result
    return result


@register_task
class Downstream(Task):
    name = "downstream"
    needs_subject = True
    report_order = 30
    # The clean, zero- and mean-ablated losses are properties of the model and the window,
    # not of the SAE: no direction is better, any change matters.
    metrics = (
        Metric("ce_clean", "equal", abs_tol=1e-3),
        Metric("ce_zero", "equal", abs_tol=1e-3),
        Metric("ce_mean", "equal", abs_tol=1e-3),
        Metric("ce_sae", "lower", abs_tol=0.02, rel_tol=0.005),
        Metric("ce_loss_recovered", "higher", abs_tol=0.005, headline=True),
        Metric("ce_loss_recovered_mean_ablation", "higher", abs_tol=0.01),
        Metric("delta_ce", "lower", abs_tol=0.02, rel_tol=0.02, headline=True),
        Metric("kl", "lower", abs_tol=0.02, rel_tol=0.02, headline=True),
    )

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        return self.run_many([sae], env)[0]

    def _window(self, env: TaskEnv) -> tuple[int, int]:
        """(sequences scored, sequences per batch): the same for every SAE of a group."""
        opts = env.task_options(self.name)
        per_seq = int(env.keep_positions.sum())
        max_tokens = int(opts.get("max_tokens", env.n_eval_tokens))
        n_seq = min(env.eval_acts.shape[0], max(1, -(-max_tokens // per_seq)))
        return n_seq, int(opts.get("seqs_per_batch", 4))

    @torch.no_grad()
    def run_many(self, saes: list[torch.nn.Module], env: TaskEnv) -> list[TaskResult]:
        """Score several SAEs with one clean pass per batch; each result equals the SAE's
        alone. All the SAEs are used batch by batch, so all must be in memory."""
        n_seq, seqs_per_batch = self._window(env)
        keep = torch.from_numpy(env.keep_positions)
        nll_clean = torch.zeros(1, dtype=torch.float64)
        nll_sae = torch.zeros(len(saes), dtype=torch.float64)
        kl_sum = [0.0] * len(saes)
        n_pred = 0
        for x, ids in _batches(env, n_seq, seqs_per_batch):
            lp_clean = clean_pass(env, x, ids)
            nll_clean += _target_nll(lp_clean, ids)
            p_clean = lp_clean.exp()
            for i, sae in enumerate(saes):
                lp_sae = _pred_logprobs(env, _splice(sae, x, keep), ids)
                nll_sae[i] += _target_nll(lp_sae, ids)[0]
                kl = kl_by_position(lp_clean, lp_sae, p_clean)
                kl_sum[i] += float(kl.double().sum())
            n_pred += x.shape[0] * (ids.shape[1] - 2)
        ce_zero, ce_mean = ablation_losses(env, n_seq, seqs_per_batch)
        ce_clean = float(nll_clean[0]) / n_pred
        details = {"n_sequences": n_seq, "predicted_tokens": n_pred, "ablation": "zero and mean"}
        out = []
        for i in range(len(saes)):
            ce_sae = float(nll_sae[i]) / n_pred
            metrics = {
                "ce_clean": ce_clean,
                "ce_sae": ce_sae,
                "ce_zero": ce_zero,
                "ce_mean": ce_mean,
                "ce_loss_recovered": _recovered(ce_zero, ce_sae, ce_clean),
                "ce_loss_recovered_mean_ablation": _recovered(ce_mean, ce_sae, ce_clean),
                "delta_ce": ce_sae - ce_clean,
                "kl": kl_sum[i] / n_pred,
            }
            out.append(TaskResult(metrics, dict(details), eval_tokens=n_pred))
        return out


def _recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    denom = ce_ablated - ce_clean
    return float("nan") if denom == 0 else (ce_ablated - ce_sae) / denom
