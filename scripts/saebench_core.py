"""SAEBench 0.6's core eval on local SAELens folders, offline: the peer side of
scripts/vs_saebench.py, run in the separate .venv-saebench (`make saebench-setup`).

SAEBench's own CLI takes SAEs from SAELens's online registry only, so this calls its
``multiple_evals`` with the settings its CLI uses (feature-wise density and
weight-based statistics on), one process for all the SAEs given, as the CLI does.
``multiple_evals`` logs and skips an SAE whose eval raises, so a missing result file is
an error here. Needs HF_HOME pointing at a hub cache that holds the model (the driver
builds it) and HF_HUB_OFFLINE=1.

    python scripts/saebench_core.py --data DIR --out DIR --batches 4 --prompts 16 SAE_DIR...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("saes", nargs="+", type=Path, help="SAELens-layout folders")
    p.add_argument("--data", required=True, help="a local folder of *.jsonl text documents")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batches", type=int, default=4, help="reconstruction (CE) batches")
    p.add_argument("--sparsity-batches", type=int, default=None, help="default: --batches")
    p.add_argument("--prompts", type=int, default=16, help="sequences per batch")
    p.add_argument("--ctx", type=int, default=128)
    args = p.parse_args()

    import torch
    import transformer_lens.loading_from_pretrained as tl_loading
    from sae_bench.evals.core.main import multiple_evals
    from sae_lens import SAE

    models = {json.loads((d / "cfg.json").read_text())["model_name"] for d in args.saes}
    for name in models:  # TransformerLens 3.9 does not list SmolLM2; its loader handles it
        if name not in tl_loading.OFFICIAL_MODEL_NAMES:
            tl_loading.OFFICIAL_MODEL_NAMES.append(name)
    torch.manual_seed(0)
    selected = [(f"local-{d.name}", SAE.load_from_disk(str(d), device="cpu")) for d in args.saes]
    multiple_evals(
        selected,
        n_eval_reconstruction_batches=args.batches,
        n_eval_sparsity_variance_batches=args.sparsity_batches or args.batches,
        eval_batch_size_prompts=args.prompts,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
        dataset=args.data,
        context_size=args.ctx,
        output_folder=str(args.out),
        device="cpu",
        force_rerun=True,
    )
    results = {n: args.out / f"{n}_custom_sae_eval_results.json" for n, _ in selected}
    missing = [n for n, path in results.items() if not path.is_file()]
    if missing:
        print(f"SAEBench skipped (its eval raised): {', '.join(missing)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
