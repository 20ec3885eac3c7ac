"""One SAE training step per baseline at d_in 576, d_sae 4608, batch 4096 tokens.

The README's reference point: a SAELens standard SAE step at this size took ~0.94 s
on the 2-core CPU. Activations are synthetic (seeded Gaussian with a mean offset, as
large as SmolLM2's after dictbench's scaling to E||x||^2 = d_in): a step's cost does
not depend on their values, except AuxK, which has no dead latents this early.
"""

from __future__ import annotations

import pytest
import torch
from bench_helpers import BATCH, D_IN, D_SAE, train_step

from dictbench import registry
from dictbench.train.trainer import make_optimizer
from tests.method_names import downstream_methods, local_methods

LOCAL = local_methods()  # every registered method that trains on activations alone


def make_sae(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    cls = registry.get_baseline(name)
    cfg = cls.config_class(d_in=D_IN, d_sae=D_SAE)
    sae = cls(cfg)
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(BATCH, D_IN, generator=g) * 0.9 + 0.3
    sae.train()
    sae.on_train_start(1000, batch)
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))
    opt = make_optimizer(sae.parameters(), 1e-4, betas)  # the trainer's optimiser
    return sae, opt, batch


@pytest.mark.sae_step
@pytest.mark.parametrize("name", LOCAL)
def test_sae_train_step(benchmark, name):
    sae, opt, batch = make_sae(name)
    train_step(sae, opt, batch, 0)  # warm-up: Adam state, allocator
    steps = iter(range(1, 10_000))
    benchmark.extra_info.update(d_in=D_IN, d_sae=D_SAE, batch_tokens=BATCH)
    loss = benchmark.pedantic(
        lambda: train_step(sae, opt, batch, next(steps)), rounds=5, iterations=1
    )
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.smollm2
@pytest.mark.parametrize("name", downstream_methods())
def test_e2e_train_step(benchmark, smollm2, name):
    """e2e steps run the 23 layers after resid_post.6 twice (clean, and spliced with
    activation gradients), so they use 2 windows of 128 tokens instead of 4096 tokens."""
    from dictbench.data.corpus import CorpusSpec, keep_positions, make_windows
    from dictbench.train.trainer import DownstreamHandle, SequenceBatch

    hook, ctx, n_seq = "resid_post.6", 128, 2
    ids = torch.from_numpy(make_windows(smollm2.tokenizer, CorpusSpec(ctx_len=ctx), "train", 8, 0))
    ids = ids[:n_seq].long()
    with torch.no_grad():
        acts = smollm2.run_to(hook, ids).float()
    scale = float((D_IN / acts[:, 1:].pow(2).sum(-1).mean()).sqrt())
    batch = SequenceBatch(acts * scale, ids, torch.from_numpy(keep_positions(ctx)))
    torch.manual_seed(0)
    cls = registry.get_baseline(name)
    sae = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE))
    sae.train()
    sae.on_train_start(1000, batch.acts[:, 1:].reshape(-1, D_IN))
    sae.downstream = DownstreamHandle(smollm2, hook, scale)
    opt = make_optimizer(sae.parameters(), 1e-4, (0.9, 0.999))
    steps = iter(range(10_000))
    benchmark.extra_info.update(hook=hook, tokens_per_step=n_seq * ctx)
    loss = benchmark.pedantic(
        lambda: train_step(sae, opt, batch, next(steps)), rounds=3, iterations=1, warmup_rounds=1
    )
    assert torch.isfinite(torch.tensor(loss))
