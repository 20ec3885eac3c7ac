"""Downstream fidelity: next-token cross-entropy with the SAE spliced into the model.

The hook-point activations of the evaluation sequences are already in the cache,
so the layers before the hook never run again: variants are stacked into one batch
and only the layers after the hook run on it. The zero- and mean-ablated losses do
not depend on the SAE, so a run computes them once (in ``env.shared``) and each SAE
costs two variants (clean, for the KL, and spliced) instead of four. Special
positions (position 0) keep their original activation in every variant, and
predictions made *at* position 0 are not averaged: they cannot change, and would
only dilute the differences.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dictbench.metric_meta import Metric
from dictbench.registry import register_task
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


@torch.no_grad()
def ablation_losses(env: TaskEnv, n_seq: int, seqs_per_batch: int) -> tuple[float, float]:
    """(ce_zero, ce_mean) over the first n_seq sequences; memoised per run."""
    key = ("downstream.ablation", n_seq)
    if key in env.shared:
        return env.shared[key]
    keep = torch.from_numpy(env.keep_positions)
    mean = torch.from_numpy(np.asarray(env.train_mean, dtype=np.float32)).to(env.device)
    nll = torch.zeros(2, dtype=torch.float64)
    n_pred = 0
    for x, ids in _batches(env, n_seq, seqs_per_batch):
        zero = x.clone()
        zero[:, keep] = 0.0
        mean_abl = x.clone()
        mean_abl[:, keep] = mean
        nll += _target_nll(_pred_logprobs(env, torch.cat([zero, mean_abl]), ids), ids)
        n_pred += ids.shape[0] * (ids.shape[1] - 2)
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

    @torch.no_grad()
    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        opts = env.task_options(self.name)
        keep = torch.from_numpy(env.keep_positions)
        per_seq = int(keep.sum())
        max_tokens = int(opts.get("max_tokens", env.n_eval_tokens))
        n_seq = min(env.eval_acts.shape[0], max(1, -(-max_tokens // per_seq)))
        seqs_per_batch = int(opts.get("seqs_per_batch", 4))
        nll = torch.zeros(2, dtype=torch.float64)
        kl_sum = 0.0
        n_pred = 0
        for x, ids in _batches(env, n_seq, seqs_per_batch):
            b, _, d = x.shape
            x_hat = x.clone()
            x_hat[:, keep] = sae(x[:, keep].reshape(-1, d)).reshape(b, per_seq, d).to(x.dtype)
            logp = _pred_logprobs(env, torch.cat([x, x_hat]), ids)
            nll += _target_nll(logp, ids)
            lp_clean, lp_sae = logp[:b], logp[b:]
            kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)
            kl_sum += float(kl.double().sum())
            n_pred += b * (ids.shape[1] - 2)
        ce_clean, ce_sae = (float(v) / n_pred for v in nll)
        ce_zero, ce_mean = ablation_losses(env, n_seq, seqs_per_batch)
        metrics = {
            "ce_clean": ce_clean,
            "ce_sae": ce_sae,
            "ce_zero": ce_zero,
            "ce_mean": ce_mean,
            "ce_loss_recovered": _recovered(ce_zero, ce_sae, ce_clean),
            "ce_loss_recovered_mean_ablation": _recovered(ce_mean, ce_sae, ce_clean),
            "delta_ce": ce_sae - ce_clean,
            "kl": kl_sum / n_pred,
        }
        details = {"n_sequences": n_seq, "predicted_tokens": n_pred, "ablation": "zero and mean"}
        return TaskResult(metrics, details, eval_tokens=n_pred)


def _recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    denom = ce_ablated - ce_clean
    return float("nan") if denom == 0 else (ce_ablated - ce_sae) / denom
