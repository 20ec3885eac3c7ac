"""Absorption: a constructed SAE whose letter latent is silenced on a known subset of
held-out words must score exactly that subset's rate; plus the weak-model guard, prompts
from a vocabulary, determinism on a tiny model and bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dictbench.errors import UserError
from dictbench.tasks import absorption_core as core
from dictbench.tasks.absorption import Absorption, score, vocab_words
from dictbench.tasks.base import TaskEnv

D = 64
MARK = 63  # the input dimension that marks a silenced word


class SilencedLetterSAE(torch.nn.Module):
    """Latent L reads letter direction e_L unless the marker is on; latent 26+L reads it
    only when the marker is on. Both decode to e_L, so on marked words 26+L absorbs L."""

    def __init__(self):
        super().__init__()
        w_enc = torch.zeros(D, 52)
        b = torch.zeros(52)
        for letter in range(26):
            w_enc[letter, letter] = 1.0
            w_enc[MARK, letter] = -10.0
            w_enc[letter, 26 + letter] = 1.0
            w_enc[MARK, 26 + letter] = 10.0
            b[26 + letter] = -10.0
        self.W_enc, self.b_enc = torch.nn.Parameter(w_enc), torch.nn.Parameter(b)
        w_dec = torch.zeros(52, D)
        for letter in range(26):
            w_dec[letter, letter] = w_dec[26 + letter, letter] = 1.0
        self.W_dec = torch.nn.Parameter(w_dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec


def _constructed(per_letter_train=12, per_letter_test=6, silenced=2, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys, test = [], [], []
    for letter in range(26):
        for j in range(per_letter_train + per_letter_test):
            x = np.zeros(D, np.float32)
            x[letter] = 3.0
            x[26:MARK] = rng.standard_normal(MARK - 26) * 0.1
            is_test = j >= per_letter_train
            if is_test and j - per_letter_train < silenced:
                x[MARK] = 1.0
            xs.append(x)
            ys.append(letter)
            test.append(is_test)
    return np.stack(xs), np.asarray(ys), np.asarray(test)


def test_silenced_subset_gives_exactly_its_rate():
    x, y, is_test = _constructed()
    truth = core.fit_ground_truth(x, y, is_test, seed=0)
    assert truth.accuracy == 1.0
    per_letter = core.measure(
        SilencedLetterSAE(), core.WordSet(x, y, is_test), truth, core.AbsorptionParams(), seed=0
    )
    assert len(per_letter) == 26
    for letter, row in per_letter.items():
        assert row["main_latents"] == [core.LETTERS.index(letter)]
        assert row["n_words"] == 6
        assert row["absorption_rate"] == pytest.approx(2 / 6, abs=1e-12)
        assert row["full_absorption_rate"] == pytest.approx(2 / 6, abs=1e-12)
        assert row["mean_absorption_fraction"] == pytest.approx(2 / 6, abs=1e-12)
    summary = core.summarise(per_letter)
    assert summary["absorption_rate"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["mean_main_latents"] == 1.0


def test_nothing_silenced_gives_zero():
    x, y, is_test = _constructed(silenced=0)
    truth = core.fit_ground_truth(x, y, is_test, seed=0)
    per_letter = core.measure(
        SilencedLetterSAE(), core.WordSet(x, y, is_test), truth, core.AbsorptionParams(), seed=0
    )
    summary = core.summarise(per_letter)
    assert summary["absorption_rate"] == 0.0 and summary["mean_absorption_fraction"] == 0.0


def _bare_env(subject=None, options=None, seed=0) -> TaskEnv:
    d = subject.d_model if subject is not None else D
    return TaskEnv(
        eval_acts=np.zeros((1, 4, d), np.float32),
        eval_token_ids=np.zeros((1, 4), np.int32),
        keep_positions=np.array([False, True, True, True]),
        train_mean=np.zeros(d, np.float32),
        hook="resid_post.1",
        subject=subject,
        seed=seed,
        batch_tokens=2048,
        options={"absorption": options or {}},
    )


def test_weak_probe_flags_and_blanks_rates():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((26 * 18, D)).astype(np.float32)  # no letter information
    y = np.repeat(np.arange(26), 18)
    is_test = np.tile(np.arange(18) >= 12, 26)
    truth = core.fit_ground_truth(x, y, is_test, seed=0)
    assert truth.accuracy < 0.6
    from dictbench.tasks.absorption import options_with_defaults

    res = score(
        SilencedLetterSAE(),
        core.WordSet(x, y, is_test),
        truth,
        options_with_defaults({}),
        _bare_env(),
        n_words=len(y),
    )
    assert res.details["weak_model"] is True
    assert math.isnan(res.metrics["absorption_rate"])
    assert res.metrics["probe_accuracy"] == truth.accuracy


class _FakeTokenizer:
    vocab_size = 6
    bos_token_id = None
    table = [" cat", "dog", " Bee", " a", " x2", " été"]

    def decode(self, ids):
        return "".join(self.table[i] for i in ids)


def test_vocab_words_keeps_spaced_ascii_alphabetic_tokens():
    assert vocab_words(_FakeTokenizer()) == [("cat", 0), ("Bee", 2)]


WORDS = [
    f"{c}{tail}"
    for c in "abcdefgh"
    for tail in ("an", "ed", "ox", "um", "ip", "ar", "ot", "el", "in", "ug", "ax", "ew")
]


def test_tiny_model_end_to_end_deterministic(tiny_llama):
    from tests.test_sparse_probing import ReluSAE

    opts = {"words": WORDS, "n_icl": 2, "min_words_per_letter": 8, "probe_floor": 0.0}
    Absorption.validate_options(opts)
    sae = ReluSAE(tiny_llama.d_model, 40)
    a = Absorption().run(sae, _bare_env(tiny_llama, opts))
    b = Absorption().run(sae, _bare_env(tiny_llama, opts))
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert a.metrics[k] == b.metrics[k] or (
            math.isnan(a.metrics[k]) and math.isnan(b.metrics[k])
        )
    assert a.details["n_words"] == len(WORDS)
    assert 0.0 <= a.metrics["probe_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"max_k": 0}, "max_k"),
        ({"probe_floor": 2}, "probe_floor"),
        ({"words": ["ok", "no 1"]}, "words"),
        ({"shape": 1}, "unknown option 'shape'"),
    ],
)
def test_bad_options(options, fragment):
    with pytest.raises(UserError) as e:
        Absorption.validate_options(options)
    assert fragment in str(e.value) and "\n" not in str(e.value)
