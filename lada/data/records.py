"""The one record type every loader produces, and the prompt/target text format.

Every model in a federation sees the same text layout, so a reasoning path written by
one model can be scored or learned by any other with its own tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

AnswerType = Literal["number", "option", "yesno"]
ANSWER_TYPES: tuple[str, ...] = ("number", "option", "yesno")

# The answer line marker (GSM8K style). Generation stops after the line that holds it.
ANSWER_MARKER = "####"

# A choice line, "<value> (<L>)": the last rationale line of the synthetic choice task
# (docs/testbed.md), naming the option whose value the chain reached, written exactly as
# that option is listed in the prompt ("Options: 4 (A) 11 (B) ..."). It links the
# calculator steps to the answer letter (lada.data.answers.check_steps checks it); it is
# not a reasoning step of its own.
CHOICE_LINE_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\(([A-Z])\)\s*$")
# A parity line, "<value> is even" or "<value> is odd": the last rationale line of the
# synthetic yes/no task (docs/testbed.md), whose questions end "... Is the answer even?";
# the answer is yes for even. Like a choice line, it links the steps to the answer and is
# checked (lada.data.answers.check_steps), and is not a reasoning step of its own.
PARITY_LINE_RE = re.compile(r"^\s*(-?\d+)\s+is\s+(even|odd)\s*$")
PARITY_QUESTION = "Is the answer even?"  # how the yes/no task's questions end
# An option labelled before its text, "A) 4" or "(A) 4" (AQuA's style).
LEADING_OPTION_LABEL_RE = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)\s*")
# An option labelled after its text, "4 (A)": how the synthetic choice task lists its
# options (value first). Letter-first labels ("A) 4", AQuA's style) are the other kind.
TRAILING_OPTION_LABEL_RE = re.compile(r"\s\(([A-Z])\)\s*$")


def is_link_line(line: str) -> bool:
    """A choice or parity line: it links the calculator steps to the answer, it is
    not a reasoning step (step counts leave it out)."""
    return bool(CHOICE_LINE_RE.match(line) or PARITY_LINE_RE.match(line))


def asks_parity(question: str) -> bool:
    """Whether a question is the yes/no task's ("... Is the answer even?")."""
    return question.rstrip().endswith(PARITY_QUESTION)


@dataclass(frozen=True)
class Example:
    """One reasoning example.

    ``rationale`` holds the reasoning steps, one per line, without the answer line.
    ``answer`` is the canonical gold answer as text: a number (``"18"``, ``"-2.5"``),
    an option letter (``"C"``) or ``"yes"``/``"no"``.
    """

    id: str
    question: str
    rationale: str
    answer: str
    answer_type: AnswerType
    domain: str = "general"
    source: str = ""
    options: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"Example {self.id!r}: answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")

    @property
    def num_steps(self) -> int:
        return sum(1 for line in self.rationale.splitlines() if line.strip() and not is_link_line(line))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = list(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        d = dict(d)
        d["options"] = tuple(d.get("options") or ())
        return cls(**d)


def format_prompt(question: str, options: tuple[str, ...] | list[str] = ()) -> str:
    """The text a model is conditioned on. Options (AQuA) are listed one per line."""
    text = f"Question: {question.strip()}\n"
    if options:
        text += "Options: " + " ".join(o.strip() for o in options) + "\n"
    return text + "Answer:\n"


def format_target(rationale: str, answer: str) -> str:
    """The text a model learns to produce: rationale lines, then the answer line."""
    rationale = rationale.strip()
    body = f"{rationale}\n" if rationale else ""
    return f"{body}{ANSWER_MARKER} {answer}"


def example_prompt(ex: Example) -> str:
    return format_prompt(ex.question, ex.options)


def example_target(ex: Example) -> str:
    return format_target(ex.rationale, ex.answer)


def capped_corpus(examples: list[Example], seed: int, max_chars: int) -> list[str]:
    """Prompt + target of ``examples`` in a seeded random order, cut before the text that
    would pass ``max_chars`` characters in total (a tokenizer-training corpus)."""
    out, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(examples)):
        text = example_prompt(examples[i]) + example_target(examples[i])
        if total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
    return out
