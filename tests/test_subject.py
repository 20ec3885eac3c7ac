"""SubjectModel hook points: run_to / run_from against the plain Hugging Face forward.

Each test is checked against something computed without dictbench's splicing
code: the unmodified model's logits, Hugging Face's own ``output_hidden_states``,
a plain forward hook that overwrites a layer's output, or call counts taken on
the real decoder layer modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from dictbench.data.subject import SubjectModel
from dictbench.errors import UserError

ARCHS = ["tiny:llama", "tiny:gpt2", "tiny:gpt_neox"]
# 3 layers: first input, first output, a middle one, the last output.
HOOKS = ["resid_pre.0", "resid_post.0", "resid_pre.1", "resid_post.1", "resid_post.2"]


@contextmanager
def count_layer_calls(layers: list[torch.nn.Module]) -> Iterator[list[int]]:
    """Counts completed forward passes of the given module objects.

    A forward (post) hook, prepended so it fires before any hook that stops the run:
    a layer whose pre-hook raises (run_to at resid_pre.0) did no work and is not counted.
    """
    counts = [0] * len(layers)
    handles = []
    for i, layer in enumerate(layers):

        def bump(_m, _a, _out, i=i):
            counts[i] += 1

        handles.append(layer.register_forward_hook(bump, prepend=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def overwrite_stream(subject: SubjectModel, hook: str, acts: torch.Tensor) -> Iterator[None]:
    """Independent splice: a plain HF hook replacing the residual stream at ``hook``."""
    kind, layer = hook.split(".")
    layer = int(layer)
    if kind == "resid_pre":

        def pre(_m, args, kwargs):
            if args:
                return (acts, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": acts}

        handle = subject.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_m, _i, out):
            return (acts, *out[1:]) if isinstance(out, tuple) else acts

        handle = subject.layers[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hook", HOOKS)
def test_run_from_of_run_to_reproduces_logits(tiny_subjects, tiny_token_ids, arch, hook):
    subject = tiny_subjects[arch]
    ids = tiny_token_ids
    with torch.no_grad():
        ref = subject.logits(ids)
        acts = subject.run_to(hook, ids)
        out = subject.run_from(hook, acts, ids)
    assert acts.shape == (*ids.shape, subject.d_model)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hook", ["resid_pre.0", "resid_post.0", "resid_post.1"])
def test_run_from_uses_the_given_acts_not_the_ids(tiny_subjects, tiny_token_ids, arch, hook):
    """input_ids only carry the shape: activations of other text give that text's logits."""
    subject = tiny_subjects[arch]
    ids_a = tiny_token_ids
    ids_b = (tiny_token_ids * 7 + 3) % 256  # same shape, different text, no BOS at all
    with torch.no_grad():
        out = subject.run_from(hook, subject.run_to(hook, ids_b), ids_a)
        ref_b = subject.logits(ids_b)
        ref_a = subject.logits(ids_a)
    assert (out - ref_b).abs().max().item() < 1e-5
    assert (out - ref_a).abs().max().item() > 1e-3  # the check above can fail


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hook", ["resid_pre.0", "resid_post.0", "resid_pre.2", "resid_post.2"])
def test_run_from_matches_a_plain_forward_hook_splice(tiny_subjects, tiny_token_ids, arch, hook):
    subject = tiny_subjects[arch]
    ids = tiny_token_ids
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        acts = subject.run_to(hook, ids)
        perturbed = 0.5 * acts + torch.randn(acts.shape, generator=g)
        out = subject.run_from(hook, perturbed, ids)
        with overwrite_stream(subject, hook, perturbed):
            ref = subject.logits(ids)
        clean = subject.logits(ids)
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - clean).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_run_to_stops_at_the_hook_layer(tiny_subjects, tiny_token_ids, arch):
    subject = tiny_subjects[arch]
    layers = list(subject.layers)
    n = subject.n_layers
    expected = {
        "resid_pre.0": [0] * n,
        "resid_pre.1": [1] + [0] * (n - 1),
        "resid_post.0": [1] + [0] * (n - 1),
        "resid_post.1": [1, 1] + [0] * (n - 2),
        f"resid_post.{n - 1}": [1] * n,
    }
    for hook, want in expected.items():
        with count_layer_calls(layers) as counts, torch.no_grad():
            subject.run_to(hook, tiny_token_ids)
        assert counts == want, hook


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hook", HOOKS)
def test_run_from_runs_only_later_layers(tiny_subjects, tiny_token_ids, arch, hook):
    subject = tiny_subjects[arch]
    originals = list(subject.layers)
    kind, layer = hook.split(".")
    p = int(layer) + (1 if kind == "resid_post" else 0)  # layers applied before the hook
    with torch.no_grad():
        acts = subject.run_to(hook, tiny_token_ids)
        with count_layer_calls(originals) as counts:
            subject.run_from(hook, acts, tiny_token_ids)
    assert counts == [0] * p + [1] * (subject.n_layers - p)
    # The real layers are back in place afterwards.
    assert all(a is b for a, b in zip(subject.layers, originals, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_restored_when_run_from_raises(tiny_subjects, tiny_token_ids, arch):
    subject = tiny_subjects[arch]
    originals = list(subject.layers)
    bad = torch.zeros(1, 2, 3)  # wrong shape: the later layers must fail
    with pytest.raises(Exception), torch.no_grad():  # noqa: B017 - any error will do
        subject.run_from("resid_post.1", bad, tiny_token_ids)
    assert all(a is b for a, b in zip(subject.layers, originals, strict=True))
    with torch.no_grad():
        ref = subject.logits(tiny_token_ids)
        out = subject.run_from(
            "resid_post.1", subject.run_to("resid_post.1", tiny_token_ids), tiny_token_ids
        )
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("hook", ["resid_post.3", "resid_pre.3", "resid_post.17"])
def test_hook_layer_out_of_range_is_a_user_error(tiny_llama, tiny_token_ids, hook):
    with pytest.raises(UserError) as e:
        tiny_llama.run_to(hook, tiny_token_ids)
    msg = str(e.value)
    assert hook.split(".")[1] in msg
    assert "0..2" in msg and "3 layers" in msg
    with pytest.raises(UserError):
        tiny_llama.run_from(hook, torch.zeros(3, 12, 32), tiny_token_ids)


@pytest.mark.parametrize("hook", ["resid_mid.1", "resid_post", "resid_post.-1", "blocks.1", ""])
def test_malformed_hook_is_a_user_error(tiny_llama, tiny_token_ids, hook):
    with pytest.raises(UserError) as e:
        tiny_llama.run_to(hook, tiny_token_ids)
    msg = str(e.value)
    assert "resid_post.L" in msg and "resid_pre.L" in msg


def test_run_to_matches_hf_hidden_states(tiny_llama, tiny_token_ids):
    subject = tiny_llama
    ids = tiny_token_ids
    with torch.no_grad():
        hs = subject.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == subject.n_layers + 1
        # hidden_states[0] is the embedding output = input of layer 0.
        assert torch.allclose(subject.run_to("resid_pre.0", ids), hs[0], atol=1e-6)
        # The last entry may have the final norm applied: compare non-final layers only.
        for layer in range(subject.n_layers - 1):
            post = subject.run_to(f"resid_post.{layer}", ids)
            pre_next = subject.run_to(f"resid_pre.{layer + 1}", ids)
            assert torch.allclose(post, hs[layer + 1], atol=1e-6), layer
            assert torch.equal(post, pre_next)
