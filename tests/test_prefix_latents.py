"""scripts/prefix_latents.py: the group shares of concept latents, on a hand-made run folder.

Why: the Matryoshka write-up in docs/reproductions.md quotes these shares; a miscounted
group boundary would turn "chance" into "hierarchical" without anyone noticing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prefix_latents.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prefix_latents", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(root: Path, groups: list[int] | None) -> None:
    """One SAE of d_sae 64: letter main latents 0, 1, 40 and probe k=1 latents 2, 63."""
    (root / "saes" / "m").mkdir(parents=True)
    (root / "results" / "m").mkdir(parents=True)
    cfg = {"sae_id": "m", "baseline": "matryoshka", "d_sae": 64, "config": {"groups": groups}}
    (root / "saes" / "m" / "cfg.json").write_text(json.dumps(cfg))
    per_letter = {"a": {"main_latents": [0, 1]}, "b": {"main_latents": [40]}}
    (root / "results" / "m" / "absorption.json").write_text(
        json.dumps({"details": {"per_letter": per_letter}})
    )
    tasks = {"t1": {"latents_k1": [2]}, "t2": {"latents_k1": [63]}}
    probing = {"details": {"ks": [1, 5], "datasets": {"d": {"tasks": tasks}}}}
    (root / "results" / "m" / "sparse_probing.json").write_text(json.dumps(probing))


def test_default_groups_at_d_sae_64(tmp_path: Path) -> None:
    # Default widths at d_sae 64: 1, 1, 2, 4, 8, 16, 32 -> ends 1, 2, 4, 8, 16, 32, 64.
    mod = load_script()
    write_run(tmp_path, None)
    rows = {r["kind"]: r for r in mod.rows_for_run(tmp_path)}
    letters = rows["letter_main"]
    assert letters["n"] == 3
    assert letters["share_0_1"] == pytest.approx(1 / 3)  # latent 0
    assert letters["share_1_2"] == pytest.approx(1 / 3)  # latent 1
    assert letters["share_32_64"] == pytest.approx(1 / 3)  # latent 40
    # The first 1/16 of 64 latents is latents 0-3: groups ending at 1, 2 and 4.
    assert letters["first_16th_share"] == pytest.approx(2 / 3)
    assert letters["first_16th_chance"] == pytest.approx(4 / 64)
    probes = rows["probe_k1"]
    assert probes["share_2_4"] == pytest.approx(0.5)  # latent 2
    assert probes["share_32_64"] == pytest.approx(0.5)  # latent 63
    assert probes["first_16th_share"] == pytest.approx(0.5)


def test_own_groups_and_bad_folder(tmp_path: Path) -> None:
    mod = load_script()
    write_run(tmp_path / "run", [32, 32])
    rows = {r["kind"]: r for r in mod.rows_for_run(tmp_path / "run")}
    assert rows["letter_main"]["share_0_32"] == pytest.approx(2 / 3)
    assert rows["letter_main"]["share_32_64"] == pytest.approx(1 / 3)
    # No group ends within the first 4 latents, so nothing counts as the first 1/16.
    assert rows["letter_main"]["first_16th_share"] == 0.0
    assert mod.main([str(tmp_path / "missing")]) == 2
