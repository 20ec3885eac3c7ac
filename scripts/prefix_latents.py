"""Where in the dictionary do the concept latents sit? A check of Matryoshka's claim that
general features live in the early prefixes, read from a run's records only.

The absorption task records each letter's main latents, and sparse probing records the
latent its k=1 probe chose for each task. Those are "general" features (first letter,
party, era, delivery). For every SAE this script counts how many of them fall in each
Matryoshka group (the default widths at the SAE's d_sae, or the SAE's own `groups`) and
prints the share beside the share chance gives (the group's width over d_sae). For a
Matryoshka SAE, shares well above chance in the first groups support the claim; for the
other methods the latent order means nothing, so their shares are the control.

    python scripts/prefix_latents.py runs/repro-probing --csv results/repro-probing/prefixes.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from dictbench.baselines.matryoshka import group_ends


def concept_latents(result_dir: Path) -> dict[str, list[int]]:
    """Main letter latents (absorption) and k=1 probe latents (sparse_probing) of one SAE."""
    out: dict[str, list[int]] = {"letter_main": [], "probe_k1": []}
    absorption = result_dir / "absorption.json"
    if absorption.is_file():
        per_letter = json.loads(absorption.read_text())["details"].get("per_letter", {})
        for row in per_letter.values():
            out["letter_main"].extend(int(j) for j in row["main_latents"])
    probing = result_dir / "sparse_probing.json"
    if probing.is_file():
        details = json.loads(probing.read_text())["details"]
        k1 = f"latents_k{details['ks'][0]}"
        for ds in details["datasets"].values():
            for task in ds["tasks"].values():
                out["probe_k1"].extend(int(j) for j in task.get(k1, []))
    return out


def group_shares(latents: list[int], ends: tuple[int, ...]) -> list[float]:
    """Share of ``latents`` in each group [ends[i-1], ends[i])."""
    counts = [0] * len(ends)
    for j in latents:
        counts[next(i for i, e in enumerate(ends) if j < e)] += 1
    total = max(1, len(latents))
    return [c / total for c in counts]


def rows_for_run(run: Path) -> list[dict[str, Any]]:
    """One row per (SAE, latent kind): counts and per-group shares beside chance."""
    rows = []
    for cfg_path in sorted((run / "saes").glob("*/cfg.json")):
        cfg = json.loads(cfg_path.read_text())
        d_sae = int(cfg["d_sae"])
        ends = group_ends(cfg["config"].get("groups"), d_sae)
        starts = (0, *ends[:-1])
        chance = [(e - s) / d_sae for s, e in zip(starts, ends, strict=True)]
        for kind, latents in concept_latents(run / "results" / cfg["sae_id"]).items():
            if not latents:
                continue
            shares = group_shares(latents, ends)
            row: dict[str, Any] = {
                "sae_id": cfg["sae_id"],
                "baseline": cfg["baseline"],
                "kind": kind,
                "n": len(latents),
                "first_16th_share": sum(
                    sh for sh, e in zip(shares, ends, strict=True) if e <= d_sae // 16
                ),
                "first_16th_chance": sum(
                    c for c, e in zip(chance, ends, strict=True) if e <= d_sae // 16
                ),
            }
            for (s, e), sh in zip(zip(starts, ends, strict=True), shares, strict=True):
                row[f"share_{s}_{e}"] = sh
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (with saes/ and results/)")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if not (args.run / "saes").is_dir():
        print(f"prefix_latents: {args.run} has no saes/ folder", file=sys.stderr)
        return 2
    rows = rows_for_run(args.run)
    for r in rows:
        print(
            f"{r['sae_id']:<28} {r['kind']:<12} n={r['n']:<4} "
            f"first 1/16: {r['first_16th_share']:.3f} (chance {r['first_16th_chance']:.3f})"
        )
    if args.csv:
        fields = sorted(
            {k for r in rows for k in r},
            key=lambda k: list(rows[0]).index(k) if k in rows[0] else len(rows[0]),
        )
        tmp = args.csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
