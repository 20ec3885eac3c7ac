"""What the judge is asked, and how its replies are read.

The prompts are plain and short so that small local judges can follow them; the
reply formats (one line of text; excerpt numbers or "None") are the ones SAEBench
uses, and parsing is strict about what counts as an answer: a reply that is not a
list of numbers or "None", or names a number that was not shown, is a failure of
that latent rather than a guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MARK_OPEN, MARK_CLOSE = "<<", ">>"
MAX_EXPLANATION_CHARS = 300

EXPLAIN_SYSTEM = (
    "You are studying one feature of a language model. You will see text excerpts in which "
    "the feature is active; the tokens where it is active are marked like <<this>>. "
    "Say what the feature responds to in one short phrase of at most 20 words. "
    "Reply with the phrase only."
)

DETECT_SYSTEM = (
    "A feature of a language model is described as: {explanation}\n"
    "Below are numbered text excerpts. The feature is active in some of them, possibly in "
    "none. Reply with the numbers of the excerpts where it is active, separated by commas, "
    "or with None. Reply with nothing else."
)

FUZZ_SYSTEM = (
    "A feature of a language model is described as: {explanation}\n"
    "Below are numbered text excerpts, each with some tokens marked like <<this>>. In some "
    "excerpts the marked tokens are the ones the feature is active on; in others they were "
    "marked at random. Reply with the numbers of the excerpts whose marks fit the "
    "description, separated by commas, or with None. Reply with nothing else."
)


class ReplyError(ValueError):
    """A judge reply that cannot be read as an answer."""


def render(pieces: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """Token strings joined into one line, marked tokens wrapped in << >>. Newlines are
    shown as spaces so every excerpt stays on its numbered line."""
    out = []
    for i, piece in enumerate(pieces):
        text = piece.replace("\r", " ").replace("\n", " ")
        if marked is not None and marked[i]:
            core = text.strip() or text  # a marked space stays visible as << >>
            lead = text[: len(text) - len(text.lstrip())] if text.strip() else ""
            text = f"{lead}{MARK_OPEN}{core}{MARK_CLOSE}"
        out.append(text)
    return "".join(out).strip()


def numbered(excerpts: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {text}" for i, text in enumerate(excerpts))


def explain_messages(excerpts: Sequence[str]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": "Excerpts:\n" + numbered(excerpts)},
    ]


def score_messages(kind: str, explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    system = (DETECT_SYSTEM if kind == "detection" else FUZZ_SYSTEM).format(explanation=explanation)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "Excerpts:\n" + numbered(excerpts)},
    ]


def parse_explanation(reply: str) -> str:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        raise ReplyError("empty explanation")
    text = re.sub(r"^(explanation|description|answer)\s*:\s*", "", lines[0], flags=re.I)
    text = text.strip().strip('"').strip()
    if not text:
        raise ReplyError("empty explanation")
    return text[:MAX_EXPLANATION_CHARS]


def parse_selection(reply: str, n: int) -> set[int]:
    """The 0-based indices of the excerpts the judge named (it numbers from 1).

    The reply must be only a list of numbers (commas, spaces or "and" between them,
    brackets and a label such as "Excerpts:" allowed) or "None". Numbers picked out
    of prose are not accepted: a weak judge that echoes "1. The United States..."
    has not answered, and reading its line numbers as a choice would invent a score.
    """
    text = reply.strip()
    if not text:
        raise ReplyError("empty reply")
    core = re.sub(r"^(answer|excerpts?|examples?)\s*:?\s*", "", text, flags=re.I)
    core = core.strip().strip("[](){}").rstrip(".").strip()
    if re.fullmatch(r"none", core, flags=re.I):
        return set()
    if not re.fullmatch(r"\d+(\s*(,|\band\b|\s)\s*\d+)*", core, flags=re.I):
        raise ReplyError(f"not a list of excerpt numbers or None: {text[:80]!r}")
    numbers = [int(m) for m in re.findall(r"\d+", core)]
    bad = [k for k in numbers if not 1 <= k <= n]
    if bad:
        raise ReplyError(f"excerpt number {bad[0]} out of range 1..{n}")
    return {k - 1 for k in numbers}
