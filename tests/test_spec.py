"""Run spec validation: every bad spec is a SpecError naming the field, before any work.

Also ``--set`` overrides (nested keys, list indices, YAML-typed values) and presets.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from dictbench import spec as specmod
from dictbench.errors import SpecError, UserError
from dictbench.spec import RunSpec, apply_override, preset_names, resolve


def _resolve_data(tmp_path, data) -> RunSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return resolve(str(path))


def _set(data: dict, dotted: str, value) -> dict:
    """Copy of ``data`` with ``dotted`` (keys and list indices) set to ``value``."""
    data = copy.deepcopy(data)
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_tiny_spec_is_valid(tmp_path, tiny_spec_data):
    spec = _resolve_data(tmp_path, tiny_spec_data)
    assert spec.preset is None  # a spec without `preset:` is complete on its own
    assert spec.model.name == "tiny:llama"
    assert spec.model.config["hidden_size"] == 32
    assert spec.corpus.ctx_len == 16 and spec.corpus.eval_fraction == 0.3
    assert spec.budget.d_sae == 64 and spec.budget.lr == 0.001
    assert spec.baselines[0].method == "l1"
    assert spec.baselines[0].params == {"l1_coefficient": 1.0}
    assert spec.tasks == tiny_spec_data["tasks"]


BAD_SPECS = [
    # (dotted field, value, text the message must contain)
    ("colour", "blue", "spec.colour"),
    ("budget.foo", 1, "spec.budget.foo"),
    ("corpus.nosuch", 1, "spec.corpus.nosuch"),
    ("budget.d_sae", "big", "budget.d_sae"),
    ("budget.batch_size", 1.5, "budget.batch_size"),
    ("budget.lr", "fast", "budget.lr"),
    ("budget.normalize_activations", "yes", "budget.normalize_activations"),
    ("model.config", 3, "model.config"),
    ("model.config", [1, 2], "model.config"),
    ("tasks", "sparsity", "spec.tasks"),
    ("budget.d_sae", 0, "budget.d_sae"),
    ("budget.d_sae", -8, "budget.d_sae"),
    ("budget.batch_size", 0, "budget.batch_size"),
    ("eval.tokens", -1, "eval.tokens"),
    ("budget.train_tokens", 100, "budget.train_tokens"),  # less than one batch of 256
    ("baselines.0.method", "nosuch", "baselines[0].method"),
    ("baselines.0.method", "os:path", "baselines[0].method"),
    ("baselines.0.params.sparsity_knob", 1.0, "baselines[0]"),
    ("baselines.0.params.d_sae", 8, "baselines[0]"),
    ("baselines", [], "baselines"),
    ("tasks.0", "nosuch", "tasks[0]"),
    ("tasks", [], "tasks"),
    ("corpus.eval_fraction", 0.0, "corpus.eval_fraction"),
    ("corpus.eval_fraction", 1.0, "corpus.eval_fraction"),
    ("corpus.eval_fraction", 1.5, "corpus.eval_fraction"),
    ("corpus.eval_fraction", -0.1, "corpus.eval_fraction"),
    ("corpus.ctx_len", 2, "corpus.ctx_len"),
    ("model.dtype", "float8", "model.dtype"),
    ("hook", "layer6", "hook"),
]


@pytest.mark.parametrize(
    "field,value,named", BAD_SPECS, ids=[f"{f}={v!r}" for f, v, _ in BAD_SPECS]
)
def test_bad_field_is_spec_error_naming_it(tmp_path, tiny_spec_data, field, value, named):
    with pytest.raises(SpecError) as err:
        _resolve_data(tmp_path, _set(tiny_spec_data, field, value))
    msg = str(err.value)
    assert named in msg
    assert "\n" not in msg  # the CLI prints it as one line


def test_unknown_hyperparameter_names_it(tmp_path, tiny_spec_data):
    data = _set(tiny_spec_data, "baselines.0.params.sparsity_knob", 1.0)
    with pytest.raises(SpecError, match=r"baselines\[0\].*sparsity_knob.*l1_coefficient"):
        _resolve_data(tmp_path, data)


def test_spec_error_is_a_user_error():
    assert issubclass(SpecError, UserError)


def test_unknown_preset(tmp_path, tiny_spec_data):
    with pytest.raises(SpecError, match=r"^preset: unknown preset 'nosuch'.*smoke"):
        resolve(preset="nosuch")
    with pytest.raises(SpecError, match="preset"):
        _resolve_data(tmp_path, {**tiny_spec_data, "preset": "nosuch"})


def test_task_options_for_a_task_not_in_tasks(tmp_path, tiny_spec_data):
    data = {**tiny_spec_data, "tasks": ["sparsity"], "task_options": {"downstream": {"x": 1}}}
    with pytest.raises(SpecError, match=r"task_options\.downstream"):
        _resolve_data(tmp_path, data)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbudget: {d_sae: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML") as err:
        resolve(str(path))
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_spec_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        resolve(str(path))


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        resolve(str(tmp_path / "absent.yaml"))


# --- --set overrides --------------------------------------------------------------------


def test_apply_override_nested_keys_create_mappings():
    data: dict = {}
    apply_override(data, "budget.d_sae=128")
    apply_override(data, "model.config.hidden_size=16")
    apply_override(data, "budget.lr=0.5")
    assert data == {"budget": {"d_sae": 128, "lr": 0.5}, "model": {"config": {"hidden_size": 16}}}


def test_apply_override_list_index():
    data = {"baselines": [{"method": "l1", "params": {"l1_coefficient": 1.0}}]}
    apply_override(data, "baselines.0.params.l1_coefficient=2")
    assert data["baselines"][0]["params"]["l1_coefficient"] == 2
    assert isinstance(data["baselines"][0]["params"]["l1_coefficient"], int)
    apply_override(data, "baselines.0.method=other")
    assert data["baselines"][0]["method"] == "other"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("3", 3),
        ("1.5", 1.5),
        ("true", True),
        ("null", None),
        ("hello", "hello"),
        ("[sparsity, dead_latents]", ["sparsity", "dead_latents"]),
        ("{a: 1}", {"a": 1}),
        ("a=b", "a=b"),  # only the first '=' splits key from value
    ],
)
def test_apply_override_values_are_yaml_typed(raw, expected):
    data: dict = {}
    apply_override(data, f"x={raw}")
    assert data["x"] == expected
    assert type(data["x"]) is type(expected)


@pytest.mark.parametrize(
    "assignment,named",
    [
        ("budget.d_sae", "budget.d_sae"),  # no '='
        ("baselines.3.method=l1", "baselines.3.method"),  # index out of range
        ("baselines.x.method=l1", "baselines.x.method"),  # not an index
        ("name.sub=1", "name.sub"),  # a string is not a mapping
    ],
)
def test_apply_override_errors(assignment, named):
    data = {"name": "x", "baselines": [{"method": "l1"}]}
    with pytest.raises(SpecError, match=r"^--set ") as err:
        apply_override(data, assignment)
    assert named in str(err.value)


def test_resolve_preset_with_overrides():
    spec = resolve(
        preset="smoke",
        overrides=[
            "budget.d_sae=256",
            "baselines.0.params.l1_coefficient=2",
            "tasks=[sparsity]",
            "corpus.ctx_len=32",
        ],
    )
    assert spec.preset == "smoke" and spec.name == "smoke"
    assert spec.budget.d_sae == 256
    assert spec.baselines[0].params == {"l1_coefficient": 2}
    assert spec.tasks == ["sparsity"]
    assert spec.corpus.ctx_len == 32
    # untouched preset values survive the merge
    smoke = specmod.load_preset_dict("smoke")
    assert spec.budget.train_tokens == smoke["budget"]["train_tokens"]
    assert spec.hook == smoke["hook"]


def test_overrides_are_validated():
    with pytest.raises(SpecError, match="budget.d_sae"):
        resolve(preset="smoke", overrides=["budget.d_sae=0"])
    with pytest.raises(SpecError, match="budget.d_saee"):
        resolve(preset="smoke", overrides=["budget.d_saee=10"])


def test_spec_file_extends_its_preset(tmp_path):
    path = tmp_path / "ext.yaml"
    path.write_text("preset: smoke\nname: mine\nbudget: {d_sae: 96}\n")
    spec = resolve(str(path))
    smoke = specmod.load_preset_dict("smoke")
    assert spec.name == "mine" and spec.preset == "smoke"
    assert spec.budget.d_sae == 96
    assert spec.budget.batch_size == smoke["budget"]["batch_size"]  # nested merge keeps siblings


# --- presets ----------------------------------------------------------------------------


def test_shipped_presets_include_the_documented_ones():
    names = preset_names()
    assert "quickstart" in names and "smoke" in names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_validates(name):
    spec = resolve(preset=name)
    assert spec.preset == name
    specmod.validate(spec)
    assert spec.baselines and spec.tasks
    # Round trip: the resolved spec, written back out, is itself a valid spec.
    again = specmod.build(RunSpec, spec.to_dict())
    specmod.validate(again)
    assert again == spec


def test_resolve_with_nothing_is_quickstart():
    spec = resolve()
    assert spec.preset == specmod.DEFAULT_PRESET == "quickstart"
    assert spec.name == "quickstart"
    assert spec == resolve(preset="quickstart")
