"""The second embedded task, ``[data] task = "choice"``: the arithmetic chains of
``lada.data.synthetic`` asked as five-option multiple choice (answer type ``option``).

Each problem is an arithmetic problem of the same domain, seed and chain length (same
question, same calculator lines), with options A-E listing candidate final values and
one more rationale line that names the option the chain reached::

    Question: Vic has 9 coins at the shop. Vic earns 2 coins. Vic buys a vase. How many coins does Vic have now?
    Options: A)4 B)11 C)3 D)2 E)7
    Answer:
    9+2=<<9+2=11>>11
    11-8=<<11-8=3>>3
    3 is option C
    #### C

Every line is checkable (``lada.data.answers.check_steps`` with the options): the notes as
before, and the choice line must name the option whose value is the last note's result,
the same option the answer line names. So a path is verified only if its chain reaches the
right value, as on the arithmetic task; a right letter guessed after a wrong chain is not.

The four wrong options are values a mistake gives, so a wrong chain usually lands on one:
the value one step before the end (a chain stopped early), the chain with one operand
changed (a missing domain fact or a misread number), then values near the answer. How
many of them lie below the answer is drawn first, so the answer's rank among the option
values is spread out (no "pick the middle value" shortcut); the options are in random order.
Everything is deterministic by the example's id.
"""

from __future__ import annotations

import dataclasses
import random
import re

from lada.data.records import Example
from lada.data.synthetic import _apply, _feasible, _operands

TASK = "choice"
LETTERS = "ABCDE"
_LINE_RE = re.compile(r"^(\d+)([-+*/])(\d+)=<<")
NEAR = 10  # near wrong values are within this distance of the answer


def choice_id(arith_id: str) -> str:
    """``syn-choice-<domain>-<seed>-<i>`` for the arithmetic problem ``syn-<domain>-<seed>-<i>``."""
    return f"syn-{TASK}-" + arith_id.removeprefix("syn-")


def _chain(rationale: str) -> tuple[int, list[tuple[str, int]]]:
    """Start value and (op, operand) steps of a synthetic arithmetic rationale."""
    steps, v0 = [], None
    for line in rationale.splitlines():
        m = _LINE_RE.match(line)
        if m is None:
            raise ValueError(f"not a synthetic calculator line: {line!r}")
        v0 = int(m.group(1)) if v0 is None else v0
        steps.append((m.group(2), int(m.group(3))))
    if v0 is None:
        raise ValueError("empty rationale")
    return v0, steps


def _run(v0: int, steps: list[tuple[str, int]]) -> int | None:
    """The chain's final value, or None if a step leaves the task's bounds."""
    v = v0
    for op, n in steps:
        if not _feasible(v, op, n):
            return None
        v = _apply(v, op, n)
    return v


def _distractors(v0: int, steps: list[tuple[str, int]], answer: int, rng: random.Random) -> list[int]:
    """Four distinct wrong values, ``below`` of them under the answer (drawn uniformly from
    what is possible, so the answer's rank is no shortcut): first the values of a chain
    stopped one step early and of a chain with one operand changed, where they fit, then
    near values (within ``NEAR`` of the answer, at least 1)."""
    below = rng.randint(0, min(4, answer - 1))
    quota = {True: below, False: 4 - below}  # is the value below the answer -> how many more
    picked: list[int] = []

    def add(x: int | None) -> None:
        if x is not None and x >= 1 and x != answer and x not in picked and quota[x < answer] > 0:
            picked.append(x)
            quota[x < answer] -= 1

    add(_run(v0, steps[:-1]))
    for i in rng.sample(range(len(steps)), len(steps)):
        op, n = steps[i]
        for m in rng.sample(list(_operands(op)), len(_operands(op))):
            x = _run(v0, [*steps[:i], (op, m), *steps[i + 1:]])
            if m != n and x is not None and x != answer:
                add(x)
                break
    near = [x for x in range(max(1, answer - NEAR), answer + NEAR + 1) if x != answer]
    for x in rng.sample(near, len(near)):
        add(x)
    return picked


def to_choice(ex: Example) -> Example:
    """The choice-task version of a synthetic arithmetic example (deterministic by its id)."""
    new_id = choice_id(ex.id)
    rng = random.Random(f"lada-synthetic/{TASK}/{new_id}")
    v0, steps = _chain(ex.rationale)
    answer = int(ex.answer)
    values = [answer, *_distractors(v0, steps, answer, rng)]
    rng.shuffle(values)
    letter = LETTERS[values.index(answer)]
    options = tuple(f"{L}){v}" for L, v in zip(LETTERS, values))
    return dataclasses.replace(ex, id=new_id, rationale=f"{ex.rationale}\n{answer} is option {letter}",
                               answer=letter, answer_type="option", options=options)
