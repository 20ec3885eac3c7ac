"""Downstream fidelity: next-token cross-entropy with the SAE spliced into the model.

The hook-point activations of the evaluation sequences are already in the cache,
so the layers before the hook never run again: the clean, SAE, zero-ablated and
mean-ablated variants are stacked into one batch and only the layers after the
hook run on it. Special positions (position 0) keep their original activation in
every variant, and predictions made *at* position 0 are not averaged: they cannot
change, and would only dilute the differences.
"""

from __future__ import annotations

import numpy as np
import torch

from dictbench.registry import register_task
from dictbench.tasks.base import Task, TaskEnv, TaskResult

VARIANTS = ("clean", "sae", "zero", "mean")


@register_task
class Downstream(Task):
    name = "downstream"
    needs_subject = True

    @torch.no_grad()
    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        opts = env.task_options(self.name)
        keep = torch.from_numpy(env.keep_positions)
        per_seq = int(keep.sum())
        max_tokens = int(opts.get("max_tokens", env.n_eval_tokens))
        n_seq = min(env.eval_acts.shape[0], max(1, -(-max_tokens // per_seq)))
        seqs_per_batch = int(opts.get("seqs_per_batch", 2))
        mean = torch.from_numpy(np.asarray(env.train_mean, dtype=np.float32)).to(env.device)
        nll = torch.zeros(len(VARIANTS), dtype=torch.float64)
        kl_sum = 0.0
        n_pred = 0
        for start in range(0, n_seq, seqs_per_batch):
            stop = min(n_seq, start + seqs_per_batch)
            block = np.asarray(env.eval_acts[start:stop])
            x = torch.tensor(block, dtype=torch.float32, device=env.device)
            ids = torch.from_numpy(np.asarray(env.eval_token_ids[start:stop])).long()
            b, t, d = x.shape
            x_hat = x.clone()
            x_hat[:, keep] = sae(x[:, keep].reshape(-1, d)).reshape(b, per_seq, d).to(x.dtype)
            zero = x.clone()
            zero[:, keep] = 0.0
            mean_abl = x.clone()
            mean_abl[:, keep] = mean
            stacked = torch.cat([x, x_hat, zero, mean_abl])
            logits = env.subject.run_from(env.hook, stacked, ids.repeat(len(VARIANTS), 1))
            # Predictions from positions 1..t-2 of the next token (targets 2..t-1).
            logp = torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
            targets = ids[:, 2:].to(logp.device).repeat(len(VARIANTS), 1)
            tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll -= tok_lp.reshape(len(VARIANTS), -1).double().sum(-1).cpu()
            lp_clean, lp_sae = logp[:b], logp[b : 2 * b]
            kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)
            kl_sum += float(kl.double().sum())
            n_pred += b * (t - 2)
        ce = (nll / n_pred).tolist()
        ce_clean, ce_sae, ce_zero, ce_mean = ce
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
