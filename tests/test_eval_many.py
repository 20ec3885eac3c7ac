"""`dictbench eval A B C`: many SAEs in one pass share the model, the evaluation
activations and the SAE-independent downstream results, and score exactly as they do
one at a time; those results are stored beside the activations and reused later."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dictbench import eval_groups, evaluate
from dictbench.data.subject import SubjectModel
from dictbench.io.sae_io import CONFIG, WEIGHTS
from dictbench.score import eval_shared
from dictbench.score.records import read_records
from dictbench.tasks import downstream

pytestmark = pytest.mark.usefixtures("torch_one_thread")
D = 32
TASKS = ["sparsity", "reconstruction", "downstream"]


def saelens_sae(folder, hook_name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D, 48, generator=g) / D**0.5,
        "b_enc": torch.zeros(48),
        "W_dec": torch.randn(48, D, generator=g) / 4,
        "b_dec": torch.zeros(D),
    }
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS))
    cfg = {"architecture": "standard", "d_in": D, "d_sae": 48, "apply_b_dec_to_input": True}
    cfg["metadata"] = {"hook_name": hook_name}
    (folder / CONFIG).write_text(json.dumps(cfg))


@pytest.fixture()
def three(tmp_path):
    for i, hook in enumerate(["blocks.1.hook_resid_post"] * 2 + ["blocks.0.hook_resid_post"]):
        saelens_sae(tmp_path / "saes" / f"s{i}", hook, seed=i)
    return tmp_path


@pytest.fixture()
def counted(monkeypatch):
    """Counts subject-model loads and ablated passes actually computed (not memoised)."""
    counts = {"loads": 0, "ablations": 0}
    real_load, real_ablation = SubjectModel.load, downstream.ablation_losses

    def load(spec):
        counts["loads"] += 1
        return real_load(spec)

    def ablation(env, n_seq, seqs_per_batch):
        if ("downstream.ablation", n_seq) not in env.shared:
            counts["ablations"] += 1
        return real_ablation(env, n_seq, seqs_per_batch)

    monkeypatch.setattr(SubjectModel, "load", staticmethod(load))
    monkeypatch.setattr(downstream, "ablation_losses", ablation)
    return counts


def metrics(out) -> dict[tuple[str, str], dict]:
    return {(r["sae_id"], r["task"]): r["metrics"] for r in read_records(out)}


def test_many_share_and_match_one_at_a_time(three, tiny_spec_file, counted):
    """The glob names the two SAEs at resid_post.1; scored together they match, record
    for record, what each gets scored alone."""
    base = three
    out = evaluate.evaluate_many(
        [str(base / "saes" / "s[01]")],
        evaluate.EvalRequest(spec_path=str(tiny_spec_file), tasks=TASKS, out=base / "many"),
    )
    assert counted == {"loads": 1, "ablations": 1}  # one model, one ablated pass, two SAEs
    many = metrics(out)
    assert {k[0] for k in many} == {"s0", "s1"}
    for i in (0, 1):
        one = evaluate.evaluate(
            base / "saes" / f"s{i}", spec_path=str(tiny_spec_file), tasks=TASKS,
            out=base / f"one{i}",
        )  # fmt: skip
        for key, m in metrics(one).items():
            assert m == many[key], key  # identical, not merely close
    info = json.loads((out / "eval.json").read_text())
    assert [s["sae_id"] for s in info["saes"]] == ["s0", "s1"] and len(info["groups"]) == 1


def test_two_hooks_make_two_groups_in_one_folder(three, tiny_spec_file, counted):
    """With several SAEs each is scored at its own hook under the one spec: one model
    load, one group (activations, ablated pass) per hook, one run folder."""
    base = three
    out = evaluate.evaluate_many(
        [base / "saes" / "s1", base / "saes" / "s2"],
        evaluate.EvalRequest(
            spec_path=str(tiny_spec_file), tasks=["sparsity", "downstream"], out=base / "two"
        ),
    )
    assert counted == {"loads": 1, "ablations": 2}
    info = json.loads((out / "eval.json").read_text())
    assert [g["spec"]["hook"] for g in info["groups"]] == ["resid_post.1", "resid_post.0"]
    recs = {r["sae_id"]: r for r in read_records(out) if r["task"] == "downstream"}
    assert recs["s1"]["context"]["hook"] == "resid_post.1"
    assert recs["s2"]["context"]["hook"] == "resid_post.0"
    assert recs["s1"]["metrics"]["ce_mean"] != recs["s2"]["metrics"]["ce_mean"]


def test_sae_independent_results_are_stored_and_reused(three, tiny_spec_file, counted):
    base = three
    first = evaluate.evaluate(
        base / "saes" / "s0", spec_path=str(tiny_spec_file), tasks=["downstream"],
        out=base / "first",
    )  # fmt: skip
    assert counted["ablations"] == 1
    (rec,) = read_records(first)
    info = json.loads((first / "eval.json").read_text())
    store = json.loads(eval_shared.path_for(_Store(info["caches"]["eval"])).read_text())
    (value,) = store.values()
    assert value == [rec["metrics"]["ce_zero"], rec["metrics"]["ce_mean"]]
    # A later process at the same fingerprint reads them: prove it by planting values
    # the model could never produce and finding them in the new record.
    path = eval_shared.path_for(_Store(info["caches"]["eval"]))
    (name,) = store
    path.write_text(json.dumps({name: [123.0, 456.0]}))
    second = evaluate.evaluate(
        base / "saes" / "s1", spec_path=str(tiny_spec_file), tasks=["downstream"],
        out=base / "second",
    )  # fmt: skip
    assert counted["ablations"] == 1  # not run again
    (rec2,) = read_records(second)
    assert (rec2["metrics"]["ce_zero"], rec2["metrics"]["ce_mean"]) == (123.0, 456.0)
    # a damaged file costs only the recomputation
    path.write_text("{not json")
    evaluate.evaluate(
        base / "saes" / "s1", spec_path=str(tiny_spec_file), tasks=["downstream"],
        out=base / "third",
    )  # fmt: skip
    assert counted["ablations"] == 2
    (rec3,) = read_records(base / "third")
    assert rec3["metrics"]["ce_zero"] == rec["metrics"]["ce_zero"]


def test_the_clean_pass_is_shared_by_the_group_and_chunks_keep_the_records(
    three, tiny_spec_file, monkeypatch
):
    """Two SAEs at one hook: one clean downstream pass per batch for both. Held one at a
    time (a memory budget of 0 bytes) each pays its own, and the records do not change."""
    calls: list[int] = []
    real_clean = downstream.clean_pass

    def counting_clean(env, x, ids):
        calls.append(x.shape[0])
        return real_clean(env, x, ids)

    monkeypatch.setattr(downstream, "clean_pass", counting_clean)
    saes = [three / "saes" / "s0", three / "saes" / "s1"]
    kw = dict(spec_path=str(tiny_spec_file), tasks=["downstream"])
    together = evaluate.evaluate_many(saes, evaluate.EvalRequest(out=three / "together", **kw))
    recs = {r["sae_id"]: r for r in read_records(together)}
    n_seq = recs["s0"]["details"]["n_sequences"]
    n_batches = -(-n_seq // 4)  # the task's default of 4 sequences per batch
    assert n_batches >= 2 and sum(calls) == n_seq
    assert len(calls) == n_batches
    assert recs["s0"]["wall_seconds"] > 0 and recs["s1"]["wall_seconds"] > 0

    monkeypatch.setattr(eval_groups, "together_budget", lambda device: 0)
    apart = evaluate.evaluate_many(saes, evaluate.EvalRequest(out=three / "apart", **kw))
    assert len(calls) == 3 * n_batches  # this call: n_batches for each of the two
    assert metrics(apart) == metrics(together)
    assert metrics(together)[("s0", "downstream")] != metrics(together)[("s1", "downstream")]


class _Store:
    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)


OUTSIDE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from dictbench.baselines.l1 import L1SAE as Outside
"""


def test_a_class_outside_dictbench_stays_refused_among_many(three, tmp_path, monkeypatch):
    """One folder in a glob naming ``module:Class``: nothing is imported, nothing scored."""
    from dictbench.baselines.l1 import L1SAE, L1Config
    from dictbench.errors import UserError
    from dictbench.io.sae_io import save_sae

    marker = tmp_path / "marker"
    (tmp_path / "outside_mod22.py").write_text(OUTSIDE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = three / "saes" / "s9"
    save_sae(L1SAE(L1Config(d_in=D, d_sae=8)), folder, {"hook": "resid_post.1"})
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["baseline"] = "outside_mod22:Outside"
    (folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="--trust-code"):
        evaluate.evaluate_many(
            [str(three / "saes" / "s*")], evaluate.EvalRequest(out=tmp_path / "ev")
        )
    assert not marker.exists() and not (tmp_path / "ev").exists()
