"""Property-based tests (hypothesis): generated bad specs and damaged files.

- A spec with one generated fault (unknown key, wrong type, out-of-range number,
  unknown name, malformed hook) makes `dictbench run` exit 2 with one line naming
  the field, before anything is written.
- A damaged SAE folder (truncated, overwritten bytes, a tensor dropped, reshaped or
  retyped, a pickle in its place, a broken cfg.json) is refused with one line naming
  the file, or loads with exactly the expected tensor shapes; a pickle is never run.
- A damaged checkpoint or activation-cache entry is refused, or reads back identical
  to what was written (damage to bytes that carry no data, such as header padding).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dictbench import cli as dictbench_cli
from dictbench.baselines.l1 import L1SAE, L1Config
from dictbench.data.cache import ActivationStore, CacheDamaged, EntryRequest, harvest
from dictbench.data.corpus import CorpusSpec
from dictbench.errors import UserError
from dictbench.io.sae_io import CONFIG, WEIGHTS, load_sae, save_sae
from dictbench.train.checkpoint import CheckpointError, TrainState, read, save

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_LINE = 400

# --- generated bad specs -------------------------------------------------------------------

INT_FIELDS = [
    "seed",
    "budget.train_tokens",
    "budget.batch_size",
    "budget.d_sae",
    "eval.tokens",
    "eval.downstream_tokens",
    "eval.batch_tokens",
    "corpus.ctx_len",
    "checkpoint_every_steps",
]
FLOAT_FIELDS = [
    "budget.lr",
    "budget.lr_warmup_frac",
    "budget.lr_decay_frac",
    "corpus.eval_fraction",
]
BOOL_FIELDS = ["budget.normalize_activations"]
STR_FIELDS = ["name", "hook", "model.name", "baselines.0.method"]
MAPPINGS = ["", "model", "corpus", "budget", "eval", "baselines.0"]
# field -> the smallest valid value minus one, or a range the value must stay out of
POSITIVE = [
    "budget.train_tokens",
    "budget.batch_size",
    "budget.d_sae",
    "eval.tokens",
    "eval.downstream_tokens",
    "eval.batch_tokens",
]
FRACTIONS = ["budget.lr_warmup_frac", "budget.lr_decay_frac"]


def _floatish(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _where(path: str) -> str:
    """The spelling error messages use for a field path: spec.baselines[0].method."""
    out = "spec"
    for part in path.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


not_int = st.one_of(
    st.text(max_size=8),
    st.floats(allow_nan=False).filter(lambda f: not float(f).is_integer()),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.none(),
)
not_float = st.one_of(
    st.text(max_size=8).filter(lambda s: not _floatish(s)),
    st.booleans(),
    st.lists(st.floats(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_bool = st.one_of(st.integers(), st.text(max_size=5), st.none())
not_str = st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.text(), max_size=2))
key = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
word = st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True)


@st.composite
def bad_specs(draw) -> tuple[str, object, str]:
    """(field path or kind, value, a fragment the one-line error must contain)."""
    kind = draw(
        st.sampled_from(["unknown", "int", "float", "bool", "str", "range", "name", "hook"])
    )
    if kind == "unknown":
        where = draw(st.sampled_from(MAPPINGS))
        k = draw(key)
        path = f"{where}.{k}" if where else k
        return path, draw(st.integers()), f"{_where(path)}: unknown field"
    if kind in ("int", "float", "bool", "str"):
        fields = {"int": INT_FIELDS, "float": FLOAT_FIELDS, "bool": BOOL_FIELDS, "str": STR_FIELDS}
        values = {"int": not_int, "float": not_float, "bool": not_bool, "str": not_str}
        path = draw(st.sampled_from(fields[kind]))
        return path, draw(values[kind]), f"{_where(path)}: expected"
    if kind == "range":
        which = draw(
            st.sampled_from(["positive", "lr", "fraction", "eval_fraction", "ctx", "ckpt"])
        )
        if which == "positive":
            path = draw(st.sampled_from(POSITIVE))
            return path, draw(st.integers(max_value=0)), f"{path}: must be positive"
        if which == "lr":
            v = draw(st.floats(max_value=0, allow_nan=False, allow_infinity=False))
            return "budget.lr", v, "budget.lr: must be positive"
        if which == "fraction":
            path = draw(st.sampled_from(FRACTIONS))
            v = draw(
                st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1 + 1e-6)).filter(
                    math.isfinite
                )
            )
            return path, v, f"{path}: must be in [0, 1]"
        if which == "eval_fraction":
            v = draw(
                st.one_of(st.floats(max_value=0), st.floats(min_value=1)).filter(math.isfinite)
            )
            return "corpus.eval_fraction", v, "corpus.eval_fraction: must be in (0, 1)"
        if which == "ctx":
            return (
                "corpus.ctx_len",
                draw(st.integers(max_value=2)),
                "corpus.ctx_len: must be at least 3",
            )
        v = draw(st.integers(max_value=-1))
        return "checkpoint_every_steps", v, "checkpoint_every_steps: must be 0"
    if kind == "name":
        which = draw(st.sampled_from(["baselines.0.method", "tasks.0", "preset"]))
        name = "nosuch_" + draw(word)  # never the name of a real module or preset
        expect = {"baselines.0.method": "baselines[0].method", "tasks.0": "tasks[0]"}
        return which, name, expect.get(which, "preset: unknown preset")
    hook = draw(st.text(max_size=12).filter(lambda s: "." not in s))
    return "hook", hook, "hook: "


def _apply(data: dict, path: str, value) -> None:
    node = data
    *head, last = path.split(".")
    for part in head:
        node = node[int(part)] if part.isdigit() else node[part]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


@SETTINGS
@given(bad=bad_specs())
def test_generated_bad_specs_exit_2_with_one_line_naming_the_field(bad, tiny_spec_factory):
    path, value, fragment = bad
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tiny_spec_factory(tmp / "cache")
        _apply(data, path, value)
        spec = tmp / "spec.yaml"
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = dictbench_cli.main(["run", str(spec), "--out", str(tmp / "out")])
        lines = err.getvalue().splitlines()
        assert code == 2, (bad, lines)
        assert len(lines) == 1, (bad, lines)
        assert lines[0].startswith("dictbench: error: ") and len(lines[0]) <= MAX_LINE, lines
        assert fragment in lines[0], (bad, lines)
        assert not (tmp / "out").exists() and not (tmp / "cache").exists()


# --- damaged SAE folders -------------------------------------------------------------------

D_IN, D_SAE = 8, 16
EXPECTED = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle was (not) loaded."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(Payload.marker),))


def _good_sae_folder(folder: Path) -> None:
    torch.manual_seed(0)
    save_sae(L1SAE(L1Config(d_in=D_IN, d_sae=D_SAE)), folder, {"sae_id": "x", "hook": "h"})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10_000, 10_000)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def sae_damage(draw):
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "overwrite",
                "drop",
                "reshape",
                "retype",
                "pickle",
                "cfg_value",
                "cfg_raw",
                "cfg_field",
            ]
        )
    )
    if kind == "truncate":
        return kind, draw(st.floats(0, 1, exclude_max=True))
    if kind == "overwrite":
        return kind, (
            draw(st.floats(0, 1, exclude_max=True)),
            draw(st.binary(min_size=1, max_size=16)),
        )
    if kind in ("drop", "reshape", "retype"):
        name = draw(st.sampled_from(sorted(EXPECTED)))
        extra = draw(st.sampled_from([torch.float16, torch.float64, torch.int32, torch.bool]))
        shape = draw(st.lists(st.integers(1, 20), min_size=1, max_size=3).map(tuple))
        return kind, (name, extra, shape)
    if kind == "pickle":
        return kind, draw(st.sampled_from(["bare", "torch.save", "named .pt"]))
    if kind == "cfg_value":
        return kind, draw(json_values)
    if kind == "cfg_raw":
        return kind, draw(st.binary(max_size=40))
    field = draw(
        st.sampled_from(
            ["baseline", "config", "config.d_sae", "config.d_in", "config.l1_coefficient"]
        )
    )
    return kind, (field, draw(json_values))


def _damage_sae(folder: Path, kind: str, arg) -> Path:
    """Apply one damage; returns the path the refusal should name."""
    weights, cfg = folder / WEIGHTS, folder / CONFIG
    if kind == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: int(arg * len(data))])
    elif kind == "overwrite":
        data = bytearray(weights.read_bytes())
        at = int(arg[0] * len(data))
        data[at : at + len(arg[1])] = arg[1]
        weights.write_bytes(bytes(data))
    elif kind in ("drop", "reshape", "retype"):
        name, dtype, shape = arg
        state = load_file(str(weights))
        if kind == "drop":
            del state[name]
        elif kind == "reshape":
            if tuple(shape) == EXPECTED[name]:
                shape = (*shape, 2)
            state[name] = torch.zeros(shape)
        else:
            state[name] = state[name].to(dtype)
        save_file(state, str(weights))
    elif kind == "pickle":
        if arg == "named .pt":
            weights.unlink()
            target = folder / "sae.pt"
            torch.save({"W_dec": Payload()}, target)
            return target
        if arg == "bare":
            weights.write_bytes(pickle.dumps({"W_dec": Payload()}))
        else:
            torch.save({"W_dec": Payload()}, weights)
    elif kind == "cfg_value":
        cfg.write_text(json.dumps(arg))
    elif kind == "cfg_raw":
        cfg.write_bytes(arg)
    else:
        field, value = arg
        data = json.loads(cfg.read_text())
        if field.startswith("config."):
            data["config"][field.split(".", 1)[1]] = value
        else:
            data[field] = value
        cfg.write_text(json.dumps(data))
    return (
        weights if kind in ("truncate", "overwrite", "drop", "reshape", "retype", "pickle") else cfg
    )


@SETTINGS
@given(damage=sae_damage())
def test_damaged_sae_files_are_refused_in_one_line_or_load_with_the_right_shapes(damage):
    kind, arg = damage
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sae"
        _good_sae_folder(folder)
        Payload.marker = str(Path(tmp) / "pwned")
        named = _damage_sae(folder, kind, arg)
        try:
            sae, _ = load_sae(folder)
        except UserError as e:
            msg = str(e)
            assert "\n" not in msg and len(msg) <= MAX_LINE, (damage, msg)
            assert str(folder) in msg, (damage, msg)
        else:
            state = sae.state_dict()
            assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED, damage
            assert all(v.dtype == torch.float32 for v in state.values()), damage
        assert not Path(Payload.marker).exists(), damage  # never unpickled
        del named


# --- damaged checkpoints and cache entries --------------------------------------------------

byte_damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
)


def _damage_bytes(path: Path, damage) -> None:
    data = bytearray(path.read_bytes())
    at = int(damage[1] * len(data))
    if damage[0] == "truncate":
        del data[at:]
    else:
        data[at] ^= damage[2]
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    sae = L1SAE(L1Config(d_in=D_IN, d_sae=D_SAE))
    opt = torch.optim.Adam(sae.parameters())
    sae.loss(torch.randn(4, D_IN), 0).total.backward()
    opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "c.safetensors"
    state = TrainState(1, torch.zeros(D_SAE, dtype=torch.bool), total_steps=2)
    save(path, {"id": 1}, sae, opt, state)
    return path.read_bytes()


@SETTINGS
@given(damage=byte_damage)
def test_any_damaged_checkpoint_is_refused_or_reads_back_identical(damage, checkpoint_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "good.safetensors", Path(tmp) / "bad.safetensors"
        good.write_bytes(checkpoint_bytes)
        bad.write_bytes(checkpoint_bytes)
        _damage_bytes(bad, damage)
        try:
            tensors, meta = read(bad)
        except CheckpointError:
            return
        want_t, want_m = read(good)
        assert meta == want_m, damage
        assert tensors.keys() == want_t.keys()
        assert all(torch.equal(tensors[k], want_t[k]) for k in tensors), damage


@pytest.fixture(scope="module")
def cache_entry(tmp_path_factory, tiny_llama, tiny_corpus_dir) -> Path:
    corpus = CorpusSpec(
        name="local", data_files=[str(tiny_corpus_dir / "*.txt")], format="text", ctx_len=16
    )
    root = tmp_path_factory.mktemp("cache")
    # 20 windows: fewer than the 64 whose bytes every open hashes, so all of them are covered
    store = harvest(
        tiny_llama, "resid_post.1", EntryRequest(corpus, "train", 300, 0), root, log=lambda m: None
    )
    assert store.acts.shape[0] == 20
    return store.path


@SETTINGS
@given(
    name=st.sampled_from(["acts.npy", "tokens.npy", "mean.npy", "meta.json"]), damage=byte_damage
)
def test_any_damaged_cache_entry_is_refused_or_reads_back_identical(name, damage, cache_entry):
    good = ActivationStore.open(cache_entry)
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / cache_entry.name
        entry.mkdir()
        for p in cache_entry.iterdir():
            (entry / p.name).write_bytes(p.read_bytes())
        _damage_bytes(entry / name, damage)
        try:
            store = ActivationStore.open(entry)
        except CacheDamaged:
            return
        assert np.array_equal(np.asarray(store.acts), np.asarray(good.acts)), (name, damage)
        assert np.array_equal(store.tokens, good.tokens) and np.array_equal(store.mean, good.mean)
        ident = ("model", "hook", "corpus", "part", "ctx_len", "n_windows", "seed", "fingerprint")
        assert {k: store.meta[k] for k in ident} == {k: good.meta[k] for k in ident}
        del store
