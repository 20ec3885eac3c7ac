"""Every bad input named in the reliability issue: one line on stderr, exit code 2,
nothing written (no run folder, no cache entry) or, where a folder existed, nothing
changed in it.

Most cases run `dictbench run` in this process (cheap: the tiny model loads in well
under a second); the two that need a fresh process (the Hugging Face hub is read in
offline mode, fixed at import time) go through the fork server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from dictbench import cli as dictbench_cli
from dictbench.data.corpus import in_eval_split

MAX_LINE = 400  # one clear line, not a dump


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = dictbench_cli.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_clear_line(code: int, lines: list[str], *fragments: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("dictbench: error: "), line
    assert len(line) <= MAX_LINE, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- the spec, the model, the corpus -------------------------------------------------------


def _set(path: str, value):
    def edit(data: dict) -> None:
        node = data
        *head, last = path.split(".")
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return edit


SPEC_CASES = {
    # id: (edit the spec data, extra argv, fragments the error line must contain)
    "unknown field": (_set("colour", "blue"), [], ["spec.colour: unknown field"]),
    "wrong type": (
        _set("budget.d_sae", "large"),
        [],
        ["spec.budget.d_sae: expected an integer, got 'large'"],
    ),
    "dictionary size 0": (_set("budget.d_sae", 0), [], ["budget.d_sae: must be positive, got 0"]),
    "dictionary size negative": (
        _set("budget.d_sae", -64),
        [],
        ["budget.d_sae: must be positive, got -64"],
    ),
    "unknown baseline": (
        _set("baselines.0.method", "nosuch"),
        [],
        ["baselines[0].method", "nosuch"],
    ),
    "unknown hyperparameter": (
        _set("baselines.0.params", {"lambda_": 1}),
        [],
        ["baselines[0].params.lambda_: not a hyperparameter of l1"],
    ),
    "unknown task": (_set("tasks", ["sparsity", "nosuch"]), [], ["tasks[1]", "nosuch"]),
    "unknown preset": (lambda d: None, ["--preset", "nosuch"], ["preset: unknown preset 'nosuch'"]),
    "negative checkpoint interval": (
        _set("checkpoint_every_steps", -1),
        [],
        ["checkpoint_every_steps: must be 0 (only at the end) or positive, got -1"],
    ),
    "unknown tiny model": (
        _set("model.name", "tiny:nosuch"),
        [],
        ["model.name: unknown tiny architecture 'nosuch'"],
    ),
    "hook out of range": (
        _set("hook", "resid_post.9"),
        [],
        ["hook: layer 9 is out of range for a model with 3 layers (0..2)"],
    ),
    "hook not a hook point": (
        _set("hook", "resid_mid.1"),
        [],
        ["hook: 'resid_mid.1' is not a hook point"],
    ),
    "no corpus files": (
        _set("corpus.data_files", ["/nonexistent/*.txt"]),
        [],
        ["corpus.data_files: no file matches '/nonexistent/*.txt'"],
    ),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_model_or_corpus(case, tmp_path, tiny_spec_data, capsys):
    edit, argv, fragments = SPEC_CASES[case]
    edit(tiny_spec_data)
    spec = write_spec(tmp_path, tiny_spec_data)
    out = tmp_path / "out"
    code, lines = run_main(["run", str(spec), "--out", str(out), *argv], capsys)
    assert_one_clear_line(code, lines, *fragments)
    assert not out.exists()
    assert not Path(tiny_spec_data["cache_dir"]).exists()


def test_corpus_too_short_says_how_many_tokens_it_has_and_needs(
    tmp_path, tiny_spec_data, tiny_corpus_dir, capsys
):
    spec = write_spec(tmp_path, tiny_spec_data)
    out = tmp_path / "out"
    code, lines = run_main(
        ["run", str(spec), "--out", str(out), "--set", "eval.tokens=100000"], capsys
    )
    # the tiny model's tokenizer is one token per byte; the eval split is fixed by seed 0
    docs = sorted(tiny_corpus_dir.glob("*.txt"))
    have = sum(len(d.read_bytes()) for i, d in enumerate(docs) if in_eval_split(i, 0, 0.3))
    windows = math.ceil(100000 / 15)  # 15 counted positions per 16-token window
    assert_one_clear_line(
        code,
        lines,
        f"corpus too short: the eval split of 'local' has {have} tokens",
        f"the budget asks for {windows} windows ({windows * 16} tokens)",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("model", {"name": "nosuch-org/nosuch-model"}, "model.name: cannot load 'nosuch-org/"),
        (
            "corpus",
            {"name": "nosuch-org/nosuch-dataset", "ctx_len": 16},
            "corpus.name: cannot load 'nosuch-org/nosuch-dataset'",
        ),
    ],
    ids=["unknown hub model", "unknown hub dataset"],
)
def test_unknown_hub_model_or_dataset(field, value, fragment, tmp_path, tiny_spec_data, cli):
    tiny_spec_data[field] = value
    spec = write_spec(tmp_path, tiny_spec_data)
    out = tmp_path / "out"
    res = cli.run(["run", str(spec), "--out", str(out)], tmp_path / "logs", tmp_path / "env")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert_one_clear_line(res.returncode, lines, fragment)
    assert not out.exists()


# --- the output folder and the cache -------------------------------------------------------


def test_output_folder_that_cannot_be_written(tmp_path, tiny_spec_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, lines = run_main(["run", str(tiny_spec_file), "--out", str(out)], capsys)
    assert_one_clear_line(code, lines, f"--out: cannot write to '{out}'")
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def finished_run(tmp_path, tiny_spec_file, capsys) -> Path:
    out = tmp_path / "done"
    code, lines = run_main(["run", str(tiny_spec_file), "--out", str(out)], capsys)
    assert code == 0, lines
    return out


def test_a_cache_entry_from_another_fingerprint_is_refused(
    tmp_path, tiny_spec_data, tiny_spec_file, finished_run, capsys
):
    cache = Path(tiny_spec_data["cache_dir"])
    train = next(cache.glob("train-*"))
    # Put the seed-0 entry where a seed-1 run looks for its own: a copied or renamed
    # folder must not be taken for activations it does not hold.
    tiny_spec_data["seed"] = 1
    spec = write_spec(tmp_path, tiny_spec_data)
    from dictbench.data.cache import fingerprint
    from dictbench.data.corpus import CorpusSpec
    from dictbench.data.subject import SubjectModel
    from dictbench.spec import resolve

    resolved = resolve(str(spec))
    subject = SubjectModel.load(resolved.model)
    n_windows = math.ceil(resolved.budget.train_tokens / 15)
    fp, _ = fingerprint(
        subject.fingerprint(),
        resolved.hook,
        CorpusSpec(**vars(resolved.corpus)),
        "train",
        n_windows,
        1,
    )
    shutil.copytree(train, cache / f"train-{fp}")
    before = snapshot(cache)
    out = tmp_path / "out"
    code, lines = run_main(["run", str(spec), "--out", str(out)], capsys)
    assert_one_clear_line(
        code,
        lines,
        f"activation cache {cache / f'train-{fp}'}: holds fingerprint {train.name[6:]}",
        "(differs in seed), this run needs " + fp,
    )
    assert snapshot(cache) == before and not out.exists()


# --- resuming ------------------------------------------------------------------------------


def test_resume_with_a_different_spec_is_refused(tmp_path, tiny_spec_file, finished_run, capsys):
    before = snapshot(finished_run)
    argv = ["run", str(tiny_spec_file), "--out", str(finished_run), "--resume"]
    code, lines = run_main([*argv, "--set", "budget.d_sae=128"], capsys)
    assert_one_clear_line(
        code,
        lines,
        f"--resume: the spec differs from the run in {finished_run} "
        "(budget.d_sae: 64 in the run, 128 now)",
    )
    assert snapshot(finished_run) == before


def test_resume_of_a_damaged_run_json_is_refused(tmp_path, tiny_spec_file, finished_run, capsys):
    run_json = finished_run / "run.json"
    run_json.write_text(run_json.read_text()[:100])
    before = snapshot(finished_run)
    code, lines = run_main(
        ["run", str(tiny_spec_file), "--out", str(finished_run), "--resume"], capsys
    )
    assert_one_clear_line(code, lines, f"--resume: {run_json} is damaged")
    assert snapshot(finished_run) == before


def test_resume_of_an_empty_folder_without_a_spec_is_refused(tmp_path, capsys):
    code, lines = run_main(["run", "--resume", "--out", str(tmp_path / "none")], capsys)
    assert_one_clear_line(code, lines, f"--resume: {tmp_path / 'none' / 'run.json'} not found")
    assert not (tmp_path / "none").exists()


def test_resume_of_a_finished_run_rewrites_nothing_but_run_json(
    tmp_path, tiny_spec_file, finished_run, capsys
):
    before = snapshot(finished_run)
    code = dictbench_cli.main(["run", str(tiny_spec_file), "--out", str(finished_run), "--resume"])
    assert code == 0
    after = snapshot(finished_run)
    assert {k: v for k, v in after.items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }
    assert json.loads(after["run.json"])["resumed"] == 1
    assert "--resume: l1 is complete; skipped" in capsys.readouterr().out


# --- SAE files from elsewhere ------------------------------------------------------------

D_IN, D_SAE = 8, 16


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was (not) loaded."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def _sae_folder(folder: Path) -> Path:
    import torch

    from dictbench.baselines.l1 import L1SAE, L1Config
    from dictbench.io.sae_io import save_sae

    torch.manual_seed(0)
    save_sae(L1SAE(L1Config(d_in=D_IN, d_sae=D_SAE)), folder, {"sae_id": "x", "hook": "h"})
    return folder


def _edit_tensors(edit):
    def apply(folder: Path) -> Path:
        from safetensors.torch import load_file, save_file

        path = folder / "sae_weights.safetensors"
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))
        return folder

    return apply


def _pickled(where: str):
    def apply(folder: Path) -> Path:
        import torch

        if where == "pt file":
            target = folder.parent / "sae.pt"
            torch.save({"W_dec": _Payload()}, target)
            return target
        if where == "folder of pt":
            (folder / "sae_weights.safetensors").unlink()
            torch.save({"W_dec": _Payload()}, folder / "model.pt")
            return folder
        torch.save({"W_dec": _Payload()}, folder / "sae_weights.safetensors")
        return folder

    return apply


def _cfg(edit):
    def apply(folder: Path) -> Path:
        path = folder / "cfg.json"
        data = json.loads(path.read_text())
        path.write_text(edit(data) if callable(edit) else edit)
        return folder

    return apply


def _truncate(folder: Path) -> Path:
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    return folder


def _zeros(shape):
    import torch

    return torch.zeros(shape)


SAE_CASES = {
    # id: (damage, fragment of the one-line refusal; {p} is the folder or file)
    "missing tensor": (
        _edit_tensors(lambda s: s.pop("b_enc")),
        "{p}/sae_weights.safetensors: missing tensor(s) b_enc",
    ),
    "wrong shape": (
        _edit_tensors(lambda s: s.__setitem__("b_enc", _zeros(7))),
        "{p}/sae_weights.safetensors: tensor b_enc has shape (7,), expected (16,)",
    ),
    "config disagrees with the weights": (
        _cfg(lambda d: json.dumps({**d, "config": {**d["config"], "d_sae": 10**9}})),
        "{p}/cfg.json: config d_sae=1000000000, d_in=8 does not match W_dec of shape (16, 8)",
    ),
    "a .pt file": (_pickled("pt file"), "{p}: a pickle-based checkpoint"),
    "a folder holding a .pt": (_pickled("folder of pt"), "{p}/model.pt: a pickle-based checkpoint"),
    "a pickle named sae_weights.safetensors": (
        _pickled("disguised"),
        "{p}/sae_weights.safetensors: a pickle-based checkpoint",
    ),
    "truncated weights": (_truncate, "{p}/sae_weights.safetensors: not a readable safetensors"),
    "cfg.json not JSON": (_cfg("{not json"), "{p}/cfg.json: not valid JSON"),
    "cfg.json without a baseline": (
        _cfg(lambda d: json.dumps({k: v for k, v in d.items() if k != "baseline"})),
        "{p}/cfg.json: no 'baseline' field",
    ),
    "config value of the wrong type": (
        _cfg(lambda d: json.dumps({**d, "config": {**d["config"], "d_sae": "16"}})),
        "{p}/cfg.json: config d_sae='16', d_in=8 does not match W_dec of shape (16, 8)",
    ),
}


@pytest.mark.parametrize("case", list(SAE_CASES))
def test_bad_sae_files_are_refused_in_one_line(case, tmp_path):
    from dictbench.errors import UserError
    from dictbench.io.sae_io import load_sae

    damage, fragment = SAE_CASES[case]
    _Payload.marker = str(tmp_path / "pwned")
    target = damage(_sae_folder(tmp_path / "sae"))
    with pytest.raises(UserError) as err:
        load_sae(target)
    msg = str(err.value)
    assert fragment.format(p=target) in msg and "\n" not in msg and len(msg) <= MAX_LINE
    assert not (tmp_path / "pwned").exists()  # never unpickled


def test_dictbench_eval_refuses_a_pickle_with_exit_2(tmp_path, capsys):
    if importlib.util.find_spec("dictbench.commands.eval") is None:
        pytest.skip("no `dictbench eval` command")
    _Payload.marker = str(tmp_path / "pwned")
    target = _pickled("pt file")(_sae_folder(tmp_path / "sae"))
    code, lines = run_main(["eval", str(target), "--out", str(tmp_path / "out")], capsys)
    assert_one_clear_line(code, lines, f"{target}: a pickle-based checkpoint")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
