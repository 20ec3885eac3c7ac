"""KL(p_clean || p_sae): how far the SAE, spliced in at the hook, moves the subject
model's next-token distribution.

One formula for both of its users, so the e2e methods train on exactly the number the
``downstream`` task reports: ``dictbench.baselines.e2e`` (and ``e2e_ds``) take the mean
over positions as their loss, ``dictbench.tasks.downstream`` sums it over a window.
Both sides are given as log-probabilities over the last axis, in the caller's dtype.
"""

from __future__ import annotations

import torch


def kl_by_position(
    lp_clean: torch.Tensor, lp_sae: torch.Tensor, p_clean: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_clean || p_sae) at each position (the last axis is the vocabulary).
    ``p_clean`` is ``lp_clean.exp()``, passed by a caller that compares one clean pass
    with several SAEs' and computes it once."""
    p = lp_clean.exp() if p_clean is None else p_clean
    return (p * (lp_clean - lp_sae)).sum(-1)


def kl_clean_to_sae(lp_clean: torch.Tensor, lp_sae: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_clean || p_sae), both given as log-probabilities."""
    return kl_by_position(lp_clean, lp_sae).mean()
