"""The run spec's dataclasses: every field a spec may set, its default and why.

``dictbench.spec`` reads YAML into these (``build``) and ``dictbench.spec_checks``
validates them; a newcomer looking for what a field means reads this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dictbench.data.corpus import CorpusSpec
from dictbench.data.subject import ModelSpec
from dictbench.data.synthetic import SyntheticSpec

# budget.source auto: stream when the training cache would be larger than this.
STREAM_ABOVE_BYTES = 4 << 30


@dataclass
class BudgetSpec:
    """The common budget every SAE in a run trains under."""

    train_tokens: int = 500_000
    batch_size: int = 1024
    d_sae: int = 4608
    lr: float = 1e-3
    lr_warmup_frac: float = 0.05
    lr_decay_frac: float = 0.2
    # Activations are rescaled so E||x||^2 = d_in during training (folded back after),
    # which makes sparsity coefficients transfer across models and hook points.
    normalize_activations: bool = True
    # "bfloat16": each SAE's training loss (forward and backward) runs under
    # torch.autocast, so matmuls take bf16 inputs; weights, Adam and every evaluation
    # stay float32. None: float32 throughout.
    autocast: str | None = None
    # Where training activations come from (bench/train/batch_stream.py). "cache": harvested
    # once into a memory-mapped cache entry and reused by later runs; "stream": computed
    # by the model as training goes, no disk; "auto": stream when the cache would exceed
    # STREAM_ABOVE_BYTES, else cache.
    source: str = "auto"
    # The shuffle buffer: tokens are shuffled within blocks of this many (whole windows);
    # memory holds one block. One block covering the split is a global shuffle.
    buffer_tokens: int = 1 << 19
    # Element type of the training cache (float16 / bfloat16 halve its disk); evaluation
    # activations stay float32.
    cache_dtype: str = "float32"


@dataclass
class EvalSpec:
    """The held-out evaluation every SAE of a run is scored on."""

    tokens: int = 65_536
    downstream_tokens: int = 16_384
    batch_tokens: int = 8192


@dataclass
class BaselineEntry:
    """One ``baselines:`` item: a method, its settings and an optional sweep."""

    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # knob name -> list of values; one SAE per value (issue 3 grows this to grids).
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    id: str | None = None


@dataclass
class RunSpec:
    """A whole run: what to train, on which activations, scored by which tasks."""

    name: str = "run"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    hook: str = "resid_post.6"
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    baselines: list[BaselineEntry] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_dir: str | None = None
    out: str | None = None
    preset: str | None = None
    # Save each SAE's training state every this many steps (and always at the end), so
    # `dictbench run --resume` loses at most this much work; 0 saves only at the end.
    checkpoint_every_steps: int = 500
    # Devices the run's SAEs are spread over, round robin (e.g. [cuda:0, cuda:1]); the
    # subject model stays on model.device. None: every SAE on the model's device.
    devices: list[str] | None = None
    # Synthetic activations with a known dictionary instead of a model and corpus
    # (model, hook and corpus are then unused); see dictbench.data.synthetic.
    synthetic: SyntheticSpec | None = None
    # Train every planned SAE once per seed (its init and token order; the data split
    # stays from ``seed``); ids get ``@seed<N>``. None: one SAE per setting, seed ``seed``.
    seeds: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as written into run.json: an API key given in task options is
        replaced by a marker (keys belong in environment variables)."""
        data = dataclasses.asdict(self)
        for opts in data["task_options"].values():
            if isinstance(opts, dict) and opts.get("api_key") is not None:
                opts["api_key"] = "<redacted>"
        return data
