"""The embedded default task: procedurally generated multi-domain arithmetic reasoning.

A problem is a start value and a chain of 1..6 operations on a running value. The
rationale has one GSM8K-style calculator line per step (``12+5=<<12+5=17>>17``), then the
answer. Numbers are kept easy on purpose (start 2-20, +/- operands 1-9, x and / by 2-5
with exact division, every intermediate value in 1..100): tiny from-scratch models fail
at copying numbers out of long questions long before they fail at arithmetic, and we
want them to fail at *reasoning length* and *domain knowledge* instead.

Domains
    ``general`` states every operand explicitly and has longer chains: it is the server's
    starting data. Every client domain (shop, farm, travel, kitchen) has its own
    phrasing and a table of implicit facts ("a hat costs 7 coins", "a horse covers 7 km
    in an hour"): some steps say "Ann buys a hat" and the operand (7) is nowhere in the
    question. A model that never trained on that domain cannot know it. Facts are
    never written down as sentences anywhere in the data; they exist only as operands
    in the rationales of that domain's problems.

Everything is deterministic by seed (``random.Random`` seeded from a string).

``[data] task = "yesno"`` asks the same problems as yes/no questions ("... Is the answer
even?"; the "task 2" part below), ``"choice"`` as five-option multiple choice; the
default ``"arith"`` is the number-answer task.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from lada.data.records import PARITY_QUESTION, Example, example_prompt, example_target

if TYPE_CHECKING:  # imported lazily at runtime: partition.py sits beside this module
    from lada.config import DataConfig
    from lada.data.partition import FederatedData

MAX_VALUE = 100  # every intermediate value stays in 1..MAX_VALUE
START_RANGE = (2, 20)
ADD_RANGE = (1, 9)
MUL_RANGE = (2, 5)
OPS = ("+", "-", "*", "/")

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo",
         "Mia", "Ned", "Omar", "Pia", "Rosa", "Sam", "Tara", "Uma", "Vic", "Will", "Yara", "Zoe")


@dataclass(frozen=True)
class Domain:
    """Phrasing and implicit facts of one domain.

    ``explicit`` maps an op to templates that state the operand (``{n}``); ``facts`` maps
    an op to (template, {thing: operand}) whose template names only ``{thing}``.
    """

    name: str
    unit: str
    opening: str  # "{name} has {s} coins."
    closing: str  # the question sentence
    explicit: dict[str, tuple[str, ...]]
    facts: dict[str, tuple[str, dict[str, int]]]
    fact_prob: float = 0.0  # chance that a step uses a fact when one fits
    step_weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1)  # default weights of 1..6 steps


GENERAL = Domain(
    name="general",
    unit="marbles",
    opening="{name} starts with {s} marbles.",
    closing="How many marbles are there at the end?",
    explicit={
        "+": ("{name} finds {n} more.", "{name} is given {n} more.", "Add {n} to the pile."),
        "-": ("{name} loses {n}.", "{name} gives away {n}.", "Take {n} from the pile."),
        "*": ("The pile becomes {n} times as big.", "Multiply the pile by {n}."),
        "/": ("The pile is split into {n} equal parts and one part is kept.", "Divide the pile by {n}."),
    },
    facts={},
)

SHOP = Domain(
    name="shop",
    unit="coins",
    opening="{name} has {s} coins at the shop.",
    closing="How many coins does {name} have now?",
    explicit={
        "+": ("{name} earns {n} coins.",),
        "-": ("{name} pays {n} coins for lunch.",),
        "*": ("The savings grow {n} times.",),
        "/": ("{name} splits the coins into {n} equal piles and keeps one.",),
    },
    facts={
        "+": ("{name} sells a {thing}.", {"pen": 2, "cup": 3, "bowl": 4, "lamp": 5, "cap": 6, "hat": 7, "vase": 8, "book": 9}),
        "-": ("{name} buys a {thing}.", {"pen": 2, "cup": 3, "bowl": 4, "lamp": 5, "cap": 6, "hat": 7, "vase": 8, "book": 9}),
        "*": ("{name} trades every coin for {thing}.", {"dimes": 2, "chips": 3, "stamps": 4, "tickets": 5}),
        "/": ("{name} trades the {thing} back into coins.", {"dimes": 2, "chips": 3, "stamps": 4, "tickets": 5}),
    },
    fact_prob=0.6,
    step_weights=(3, 3, 2, 2, 1, 1),
)

FARM = Domain(
    name="farm",
    unit="apples",
    opening="On the farm, {name} has {s} apples.",
    closing="How many apples are left on the farm?",
    explicit={
        "+": ("{name} picks {n} more apples.",),
        "-": ("{name} gives {n} apples to a neighbour.",),
        "*": ("The harvest grows {n} times.",),
        "/": ("{name} shares them among {n} barns and keeps one share.",),
    },
    facts={
        "+": ("{name} fills a {thing} in the orchard.", {"bag": 2, "tray": 3, "pail": 4, "basket": 5, "sack": 7, "crate": 9}),
        "-": ("{name} feeds the {thing}.", {"rabbit": 1, "sheep": 2, "goat": 3, "pig": 5, "cow": 6, "horse": 8}),
        "*": ("{name} plants each one as a row of {thing}.", {"beans": 2, "corn": 3, "onions": 4, "carrots": 5}),
        "/": ("{name} gathers them back into rows of {thing}.", {"beans": 2, "corn": 3, "onions": 4, "carrots": 5}),
    },
    fact_prob=0.6,
    step_weights=(3, 3, 2, 2, 1, 1),
)

TRAVEL = Domain(
    name="travel",
    unit="km",
    opening="{name} has travelled {s} km so far.",
    closing="How many km is the trip?",
    explicit={
        "+": ("{name} drives {n} km further.",),
        "-": ("{name} goes back {n} km.",),
        "*": ("The route gets {n} times as long.",),
        "/": ("{name} splits the route into {n} equal legs and rides one.",),
    },
    facts={
        "+": ("{name} rides a {thing} for an hour.", {"canoe": 2, "raft": 3, "mule": 4, "camel": 5, "horse": 7, "cart": 9}),
        "-": ("{name} takes a shortcut over the {thing}.", {"lane": 1, "gate": 2, "ford": 3, "pass": 5, "bridge": 6, "tunnel": 8}),
        "*": ("{name} covers that on each day of a {thing}.", {"weekend": 2, "short break": 3, "festival": 4, "school week": 5}),
        "/": ("{name} spreads it over a {thing} and counts one day.", {"weekend": 2, "short break": 3, "festival": 4, "school week": 5}),
    },
    fact_prob=0.6,
    step_weights=(3, 3, 2, 2, 1, 1),
)

KITCHEN = Domain(
    name="kitchen",
    unit="spoons of sugar",
    opening="In the kitchen, {name} has {s} spoons of sugar.",
    closing="How many spoons of sugar are there now?",
    explicit={
        "+": ("{name} opens a bag with {n} spoons.",),
        "-": ("{name} spills {n} spoons.",),
        "*": ("The recipe is scaled up {n} times.",),
        "/": ("{name} divides it into {n} jars and keeps one jar.",),
    },
    facts={
        "+": ("{name} saves the sugar of a {thing}.", {"muffin": 2, "cookie": 3, "bun": 4, "tart": 5, "pie": 7, "cake": 9}),
        "-": ("{name} fills a {thing} from the jar.", {"thimble": 1, "glass": 2, "mug": 3, "bowl": 5, "jug": 6, "pot": 8}),
        "*": ("{name} cuts every spoonful into {thing}.", {"halves": 2, "thirds": 3, "quarters": 4, "fifths": 5}),
        "/": ("{name} joins the {thing} back into whole spoons.", {"halves": 2, "thirds": 3, "quarters": 4, "fifths": 5}),
    },
    fact_prob=0.6,
    step_weights=(3, 3, 2, 2, 1, 1),
)

_ALL = (GENERAL, SHOP, FARM, TRAVEL, KITCHEN)
DOMAINS: dict[str, Domain] = {d.name: d for d in _ALL}
CLIENT_DOMAINS: tuple[str, ...] = tuple(d.name for d in _ALL if d.facts)

# ----------------------------------------------------------------------------- generated domains
# Beyond the named domains, ``gen<k>`` (gen0, gen1, ...) are built from word pools by a
# generator seeded with k: a setting (place and unit), phrasings picked from template
# pools, and fact tables that give their own operand to each of their things. Two
# generated domains may share a noun, but not its value: the facts are what a client
# knows that nobody else does. The named domains above are untouched by this.
GENERATED_PREFIX = "gen"
_SETTINGS = (("garden", "flowers"), ("library", "books"), ("harbour", "fish"), ("bakery", "loaves"),
             ("workshop", "nails"), ("school", "pencils"), ("market", "beads"), ("mine", "gems"),
             ("forest", "logs"), ("studio", "paints"), ("castle", "stones"), ("island", "shells"),
             ("factory", "bolts"), ("stadium", "seats"), ("station", "crates"), ("museum", "medals"),
             ("camp", "matches"), ("pond", "pebbles"), ("tower", "bells"), ("village", "candles"))
_OPENINGS = ("At the {place}, {name} has {s} {unit}.", "{name} keeps {s} {unit} at the {place}.",
             "In the {place}, {name} counts {s} {unit}.")
_CLOSINGS = ("How many {unit} does {name} have now?", "How many {unit} are at the {place} in the end?",
             "How many {unit} are left?")
_EXPLICIT = {
    "+": ("{name} collects {n} more {unit}.", "{name} gets {n} extra {unit}.", "{n} new {unit} arrive."),
    "-": ("{name} hands out {n} {unit}.", "{n} {unit} go missing.", "{name} uses up {n} {unit}."),
    "*": ("The stock of {unit} grows {n} times.", "{name} makes it {n} times as many."),
    "/": ("{name} packs them into {n} equal boxes and keeps one.", "{name} splits them {n} ways and keeps a share."),
}
_FACT_TEMPLATES = {
    "+": ("{name} opens a {thing}.", "{name} wins a {thing}.", "{name} finds a {thing}."),
    "-": ("{name} fills a {thing}.", "{name} pays for a {thing}.", "{name} gives away a {thing}."),
    "*": ("{name} turns each one into {thing}.", "{name} swaps every one for {thing}."),
    "/": ("{name} turns the {thing} back.", "{name} changes the {thing} back again."),
}
_NOUNS = ("box", "bag", "jar", "sack", "tin", "chest", "crate", "basket", "bucket", "barrel", "parcel", "pouch",
          "drawer", "shelf", "tray", "bundle", "case", "cart", "trunk", "kit")
_GROUPS = ("pairs", "trios", "fours", "fives", "dozens", "stacks", "rows", "piles", "rings", "sets")
_GENERATED: dict[str, Domain] = {}


def generated_index(name: str) -> int | None:
    """k for a generated domain name ``gen<k>``, else None."""
    rest = name[len(GENERATED_PREFIX):] if name.startswith(GENERATED_PREFIX) else ""
    return int(rest) if rest.isdigit() and (rest == "0" or not rest.startswith("0")) else None


def generated_domain(k: int) -> Domain:
    """Generated domain ``gen<k>``: deterministic by k."""
    name = f"{GENERATED_PREFIX}{k}"
    if name not in _GENERATED:
        rng = random.Random(f"lada-synthetic/domain/{k}")
        place, unit = _SETTINGS[k % len(_SETTINGS)]
        sub = {"place": place, "unit": unit}

        def fill(t: str) -> str:  # fill the setting, keep the per-problem fields
            return t.replace("{place}", place).replace("{unit}", unit)

        explicit = {op: (fill(rng.choice(ts)),) for op, ts in _EXPLICIT.items()}
        adds = rng.sample(_NOUNS, 12)
        groups = rng.sample(_GROUPS, 4)
        mul_values = rng.sample(list(_operands("*")), 4)
        facts = {
            "+": (fill(rng.choice(_FACT_TEMPLATES["+"])), {t: rng.randint(*ADD_RANGE) for t in adds[:6]}),
            "-": (fill(rng.choice(_FACT_TEMPLATES["-"])), {t: rng.randint(*ADD_RANGE) for t in adds[6:]}),
            "*": (fill(rng.choice(_FACT_TEMPLATES["*"])), dict(zip(groups, mul_values))),
            "/": (fill(rng.choice(_FACT_TEMPLATES["/"])), dict(zip(groups, mul_values))),
        }
        _GENERATED[name] = Domain(name=name, unit=unit, opening=fill(rng.choice(_OPENINGS)).format_map(_Keep(sub)),
                                  closing=fill(rng.choice(_CLOSINGS)), explicit=explicit, facts=facts,
                                  fact_prob=0.6, step_weights=(3, 3, 2, 2, 1, 1))
    return _GENERATED[name]


class _Keep(dict):
    """format_map helper: leaves unknown fields as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def is_client_domain(name: str) -> bool:
    return name in CLIENT_DOMAINS or generated_index(name) is not None


def domain_facts(domain: str) -> dict[str, dict[str, int]]:
    """The implicit facts of a domain as {op: {thing: operand}} (empty for general)."""
    return {op: dict(table) for op, (_, table) in _domain(domain).facts.items()}


def _domain(name: str) -> Domain:
    if name in DOMAINS:
        return DOMAINS[name]
    k = generated_index(name)
    if k is None:
        raise ValueError(f"unknown synthetic domain {name!r}; known: {sorted(DOMAINS)} and generated "
                         f"{GENERATED_PREFIX}0, {GENERATED_PREFIX}1, ...")
    return generated_domain(k)


def _apply(v: int, op: str, n: int) -> int:
    return {"+": v + n, "-": v - n, "*": v * n, "/": v // n}[op]


def _feasible(v: int, op: str, n: int) -> bool:
    if op == "/":
        return v % n == 0 and v // n >= 1
    return 1 <= _apply(v, op, n) <= MAX_VALUE


def _operands(op: str) -> range:
    lo, hi = ADD_RANGE if op in "+-" else MUL_RANGE
    return range(lo, hi + 1)


@dataclass(frozen=True)
class _Step:
    op: str
    n: int
    sentence: str
    fact: str = ""  # the thing whose implicit value is n; empty for explicit steps


def _make_problem(dom: Domain, k: int, rng: random.Random) -> tuple[int, list[_Step], str]:
    """Draw a start value and ``k`` feasible steps; at least one fact step in client domains."""
    name = rng.choice(NAMES)
    while True:
        v0 = rng.randint(*START_RANGE)
        v, steps = v0, []
        fact_slot = rng.randrange(k) if dom.facts else -1  # this step must use a fact
        for i in range(k):
            step = _draw_step(dom, v, rng, force_fact=(i == fact_slot), name=name)
            if step is None:
                break
            steps.append(step)
            v = _apply(v, step.op, step.n)
        if len(steps) == k:
            return v0, steps, name


def _draw_step(dom: Domain, v: int, rng: random.Random, force_fact: bool, name: str) -> _Step | None:
    use_fact = bool(dom.facts) and (force_fact or rng.random() < dom.fact_prob)
    if use_fact:
        choices = [(op, thing, n) for op, (_, table) in dom.facts.items()
                   for thing, n in table.items() if _feasible(v, op, n)]
        if not choices:
            return None
        op, thing, n = rng.choice(choices)
        return _Step(op, n, dom.facts[op][0].format(name=name, thing=thing), fact=thing)
    ops = [op for op in OPS if any(_feasible(v, op, n) for n in _operands(op))]
    op = rng.choice(ops)
    n = rng.choice([n for n in _operands(op) if _feasible(v, op, n)])
    return _Step(op, n, rng.choice(dom.explicit[op]).format(name=name, n=n))


def _render(dom: Domain, v0: int, steps: list[_Step], name: str) -> tuple[str, str, int]:
    question = " ".join([dom.opening.format(name=name, s=v0), *(s.sentence for s in steps),
                         dom.closing.format(name=name)])
    lines, v = [], v0
    for s in steps:
        r = _apply(v, s.op, s.n)
        lines.append(f"{v}{s.op}{s.n}=<<{v}{s.op}{s.n}={r}>>{r}")
        v = r
    return question, "\n".join(lines), v


def _step_counts(dom: Domain, n: int, min_steps: int, max_steps: int,
                 step_weights: Sequence[float] | None, rng: random.Random) -> list[int]:
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}..{max_steps}")
    ks = list(range(min_steps, max_steps + 1))
    if step_weights is None:
        base = dom.step_weights
        weights = [base[k - 1] if k - 1 < len(base) else base[-1] for k in ks]
    else:
        if len(step_weights) != len(ks):
            raise ValueError(f"step_weights has {len(step_weights)} entries for {len(ks)} step counts {ks}")
        weights = list(step_weights)
    return rng.choices(ks, weights=weights, k=n)


def generate(domain: str, n: int, seed: int, min_steps: int = 1, max_steps: int = 6,
             step_weights: Sequence[float] | None = None, exclude: set[str] | None = None,
             task: str = "arith") -> list[Example]:
    """``n`` distinct problems of one domain, deterministic by (domain, n, seed, steps).

    ``step_weights`` (one weight per step count in min..max) overrides the domain's
    default distribution (general: uniform; client domains: skewed towards short).
    Questions already in ``exclude`` are skipped, so callers can keep sets disjoint.
    ``task = "yesno"`` / ``"choice"``: the same problems as yes/no questions or multiple
    choice (the "task 2" part below); ``exclude`` may hold questions of any task.
    """
    check_task(task)
    dom = _domain(domain)
    rng = random.Random(f"lada-synthetic/{domain}/{seed}/{min_steps}-{max_steps}")
    seen = {base_question(q) for q in exclude or ()}
    out: list[Example] = []
    for k in _step_counts(dom, n, min_steps, max_steps, step_weights, rng):
        for _ in range(1000):
            v0, steps, name = _make_problem(dom, k, rng)
            question, rationale, answer = _render(dom, v0, steps, name)
            if question not in seen:
                break
        else:
            raise ValueError(f"cannot draw {n} distinct {domain!r} problems with {min_steps}..{max_steps} steps")
        seen.add(question)
        out.append(Example(id=f"syn-{domain}-{seed}-{len(out)}", question=question, rationale=rationale,
                           answer=str(answer), answer_type="number", domain=domain, source="synthetic"))
    if task == CHOICE_TASK:
        out = [to_choice(ex) for ex in out]
    elif task == YESNO_TASK:
        out = [to_yesno(ex) for ex in out]
    return out


# [data] task: number answers, the same chains asked as yes/no questions, or as options A-E
TASKS = ("arith", "yesno", "choice")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {list(TASKS)}")


def example_id(task: str, domain: str, seed: int, suffix: str) -> str:
    """``syn-<domain>-<seed>-<suffix>`` (arith) or ``syn-<task>-<domain>-...`` (other tasks)."""
    return f"syn-{domain}-{seed}-{suffix}" if task == "arith" else f"syn-{task}-{domain}-{seed}-{suffix}"


# ----------------------------------------------------------------------------- task 2: yes/no
# The second embedded task, ``[data] task = "yesno"``: the arithmetic chains above asked
# as yes/no questions (answer type ``yesno``). The question adds one sentence, "Is the answer
# even?", and the rationale one parity line that links the chain to the answer::
#
#     Question: Vic has 9 coins at the shop. Vic earns 2 coins. Vic buys a vase. How many coins does Vic have now? Is the answer even?
#     Answer:
#     9+2=<<9+2=11>>11
#     11-8=<<11-8=3>>3
#     3 is odd
#     #### no
#
# The last step is local: the parity of the number just written. Models of the clients'
# size learn it at once (a right chain gives the right answer in every case measured),
# where they did not learn to compare the result with a threshold copied from the question
# (62-65% right after a right chain) nor to find it among listed options (the choice task
# below; docs/testbed.md, "Task 2").
#
# Every line is checkable (``lada.data.answers.check_steps`` with ``parity=True``): the notes
# as before, and the parity line must be true, name the last note's result, and agree with
# the answer line. So a path is verified only if its chain reaches the right value; a right
# yes after a wrong chain is not. A wrong chain's value has the right parity about half the
# time (52% of the choice task's mistake values), so a guess or a wrong chain scores about 50%.
# About 52-55% of answers are yes (even), depending on the domain.

YESNO_TASK = "yesno"


def base_question(question: str) -> str:
    """The arithmetic question a yes/no (or any) task question was made from."""
    return question.rstrip().removesuffix(PARITY_QUESTION).rstrip()


def to_yesno(ex: Example) -> Example:
    """The yes/no-task version of a synthetic arithmetic example."""
    answer = int(ex.answer)
    even = answer % 2 == 0
    return dataclasses.replace(ex, id=task_id(YESNO_TASK, ex.id), question=f"{ex.question} {PARITY_QUESTION}",
                               rationale=f"{ex.rationale}\n{answer} is {'even' if even else 'odd'}",
                               answer="yes" if even else "no", answer_type="yesno")


# ----------------------------------------------------------------------------- task 2: multiple choice
# ``[data] task = "choice"``: the arithmetic chains above asked as five-option multiple
# choice (answer type ``option``). Measured: tiny models reach the right value and then
# guess the letter (docs/testbed.md, "Task 2"), so it exercises the option answer path
# and is not used for evidence.
#
# Each problem is an arithmetic problem of the same domain, seed and chain length (same
# question, same calculator lines), with options A-E listing candidate final values and
# one more rationale line that names the option the chain reached::
#
#     Question: Vic has 9 coins at the shop. Vic earns 2 coins. Vic buys a vase. How many coins does Vic have now?
#     Options: 4 (A) 11 (B) 3 (C) 2 (D) 7 (E)
#     Answer:
#     9+2=<<9+2=11>>11
#     11-8=<<11-8=3>>3
#     3 (C)
#     #### C
#
# Each option lists its value before its letter, and the choice line repeats the chosen
# option as listed, so picking the letter is a copy: find the chain's result among the
# options and write what follows it. With the letter first (``A)4``, the AQuA style) the
# model must fetch the token *before* a match; a four-layer server warm-up on 12.5M tokens
# got its chains right and still scored 15% (below chance) that way (docs/testbed.md).
#
# Every line is checkable (``lada.data.answers.check_steps`` with the options): the notes as
# before, and the choice line must name the option whose value is the last note's result,
# the same option the answer line names. So a path is verified only if its chain reaches the
# right value, as on the arithmetic task; a right letter guessed after a wrong chain is not.
#
# The four wrong options are values a mistake gives, so a wrong chain usually lands on one:
# the value one step before the end (a chain stopped early), the chain with one operand
# changed (a missing domain fact or a misread number), then values near the answer. How
# many of them lie below the answer is drawn first, so the answer's rank among the option
# values is spread out (no "pick the middle value" shortcut); the options are in random order.
# Everything is deterministic by the example's id.

CHOICE_TASK = "choice"
CHOICE_LETTERS = "ABCDE"
_CHOICE_CALC_RE = re.compile(r"^(\d+)([-+*/])(\d+)=<<")
CHOICE_NEAR = 10  # near wrong values are within this distance of the answer


def task_id(task: str, arith_id: str) -> str:
    """``syn-<task>-<domain>-<seed>-<i>`` for the arithmetic problem ``syn-<domain>-<seed>-<i>``."""
    return f"syn-{task}-" + arith_id.removeprefix("syn-")


def _parse_chain(rationale: str) -> tuple[int, list[tuple[str, int]]]:
    """Start value and (op, operand) steps of a synthetic arithmetic rationale."""
    steps, v0 = [], None
    for line in rationale.splitlines():
        m = _CHOICE_CALC_RE.match(line)
        if m is None:
            raise ValueError(f"not a synthetic calculator line: {line!r}")
        v0 = int(m.group(1)) if v0 is None else v0
        steps.append((m.group(2), int(m.group(3))))
    if v0 is None:
        raise ValueError("empty rationale")
    return v0, steps


def _run_chain(v0: int, steps: list[tuple[str, int]]) -> int | None:
    """The chain's final value, or None if a step leaves the task's bounds."""
    v = v0
    for op, n in steps:
        if not _feasible(v, op, n):
            return None
        v = _apply(v, op, n)
    return v


def _mistakes(v0: int, steps: list[tuple[str, int]], answer: int, rng: random.Random) -> list[int | None]:
    """Values a mistake gives: the chain stopped one step early (the start value for a
    one-step chain), then, for each step in random order, the chain with that step's
    operand changed (the first change, in random order, that stays in bounds)."""
    out: list[int | None] = [_run_chain(v0, steps[:-1])]
    for i in rng.sample(range(len(steps)), len(steps)):
        op, n = steps[i]
        for m in rng.sample(list(_operands(op)), len(_operands(op))):
            x = _run_chain(v0, [*steps[:i], (op, m), *steps[i + 1:]])
            if m != n and x is not None and x != answer:
                out.append(x)
                break
    return out


def _choice_distractors(v0: int, steps: list[tuple[str, int]], answer: int, rng: random.Random) -> list[int]:
    """Four distinct wrong values, ``below`` of them under the answer (drawn uniformly from
    what is possible, so the answer's rank is no shortcut): first the values of a chain
    stopped one step early and of a chain with one operand changed, where they fit, then
    near values (within ``CHOICE_NEAR`` of the answer, at least 1)."""
    below = rng.randint(0, min(4, answer - 1))
    quota = {True: below, False: 4 - below}  # is the value below the answer -> how many more
    picked: list[int] = []

    def add(x: int | None) -> None:
        if x is not None and x >= 1 and x != answer and x not in picked and quota[x < answer] > 0:
            picked.append(x)
            quota[x < answer] -= 1

    for x in _mistakes(v0, steps, answer, rng):
        add(x)
    near = [x for x in range(max(1, answer - CHOICE_NEAR), answer + CHOICE_NEAR + 1) if x != answer]
    for x in rng.sample(near, len(near)):
        add(x)
    return picked


def to_choice(ex: Example) -> Example:
    """The choice-task version of a synthetic arithmetic example (deterministic by its id)."""
    new_id = task_id(CHOICE_TASK, ex.id)
    rng = random.Random(f"lada-synthetic/{CHOICE_TASK}/{new_id}")
    v0, steps = _parse_chain(ex.rationale)
    answer = int(ex.answer)
    values = [answer, *_choice_distractors(v0, steps, answer, rng)]
    rng.shuffle(values)
    letter = CHOICE_LETTERS[values.index(answer)]
    options = tuple(f"{v} ({L})" for L, v in zip(CHOICE_LETTERS, values))
    return dataclasses.replace(ex, id=new_id, rationale=f"{ex.rationale}\n{answer} ({letter})",
                               answer=letter, answer_type="option", options=options)


# ----------------------------------------------------------------------------- federation

def _shares(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal integers (earlier parts get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def federated_sizes(data_cfg: "DataConfig") -> dict[str, dict[str, int]]:
    """How many problems of each domain go to each set.

    * client k: ``train_per_client + test_per_client`` of domain ``domains[k]``;
    * public: half general, the other half split equally over the client domains;
    * server_test: equal shares of general and every client domain (so per-domain
      accuracy has the same precision everywhere);
    * server_train: general only (``server_train_size``).
    """
    doms = _client_domains(data_cfg)
    pub_general = data_cfg.public_size - data_cfg.public_size // 2
    pub = dict(zip(doms, _shares(data_cfg.public_size // 2, len(doms))))
    test = dict(zip(["general", *doms], _shares(data_cfg.server_test_size, len(doms) + 1)))
    return {
        "public": {"general": pub_general, **pub},
        "server_test": test,
        "server_train": {"general": data_cfg.server_train_size},
    }


def check_domains(domains: list[str], num_clients: int) -> str | None:
    """What is wrong with ``data.domains`` for ``num_clients`` clients, or None."""
    domains = domains[:num_clients]
    for d in domains:
        if not is_client_domain(d):
            return (f"{d!r} is not a synthetic client domain; choose from {CLIENT_DOMAINS} or generated ones "
                    f"({GENERATED_PREFIX}0, {GENERATED_PREFIX}1, ...)")
    if len(set(domains)) != len(domains):
        return f"each client needs its own domain, got {domains}"
    return None


def client_domains(data_cfg: "DataConfig") -> list[str]:
    """One domain per client: the first ``num_clients`` of ``data.domains``, then
    generated domains (gen0, gen1, ... not already listed) for the clients beyond them."""
    doms = list(data_cfg.domains)[:data_cfg.num_clients]
    problem = check_domains(doms, data_cfg.num_clients)
    if problem:
        raise ValueError(f"data.domains: {problem}")
    k = 0
    while len(doms) < data_cfg.num_clients:
        name = f"{GENERATED_PREFIX}{k}"
        if name not in doms:
            doms.append(name)
        k += 1
    return doms


_client_domains = client_domains


def build_synthetic(data_cfg: "DataConfig", seed: int) -> "FederatedData":
    """The synthetic federation: one domain per client, a mixed public set and server test
    set, and general-only server training data. All sets are disjoint by id and by
    question text; one pool per domain is drawn and sliced, so everything is
    deterministic by seed."""
    from lada.data.partition import ClientShard, FederatedData

    doms = _client_domains(data_cfg)
    sizes = federated_sizes(data_cfg)
    need = {d: 0 for d in ["general", *doms]}
    for table in sizes.values():
        for d, n in table.items():
            need[d] += n
    for d in doms:
        need[d] += data_cfg.train_per_client + data_cfg.test_per_client
    task = getattr(data_cfg, "task", "arith")
    pools = {d: generate(d, n, seed, task=task) for d, n in need.items()}
    cursor = {d: 0 for d in pools}

    def take(d: str, n: int) -> list[Example]:
        out = pools[d][cursor[d]:cursor[d] + n]
        cursor[d] += n
        return out

    clients = []
    for d in doms:
        train = take(d, data_cfg.train_per_client)
        test = take(d, data_cfg.test_per_client)
        clients.append(ClientShard(train=train, test=test))
    sets = {}
    for set_name in ("public", "server_test", "server_train"):
        items: list[Example] = []
        for d, n in sizes[set_name].items():
            items += take(d, n)
        sets[set_name] = items
    # The testbed options below draw their problems from extra streams and only drop or
    # replace items of the sets above, so the pools, the client train shards and the
    # server's training data (what the warm-ups are fingerprinted on) stay the same
    # whatever the options say; with the options at their defaults nothing changes.
    seen = {ex.question for xs in pools.values() for ex in xs}
    test_steps = list(getattr(data_cfg, "client_test_steps", []) or [])
    if test_steps:
        lo, hi = test_steps
        for k, d in enumerate(doms):
            clients[k] = ClientShard(train=clients[k].train, test=_extra(
                d, data_cfg.test_per_client, seed, "test", seen, lo, hi, [1.0] * (hi - lo + 1), task))
    general_share = getattr(data_cfg, "client_test_general_share", 0.0)
    if general_share:
        # one draw for all clients (ids stay unique), dealt out in client order
        lo, hi = test_steps or (1, 6)
        n_gen = round(general_share * data_cfg.test_per_client)
        drawn = _extra("general", n_gen * len(doms), seed, "test", seen, lo, hi, [1.0] * (hi - lo + 1), task)
        for k in range(len(doms)):
            own = clients[k].test[:data_cfg.test_per_client - n_gen]
            clients[k] = ClientShard(train=clients[k].train, test=own + drawn[k * n_gen:(k + 1) * n_gen])
    share = getattr(data_cfg, "public_domain_share", DEFAULT_PUBLIC_DOMAIN_SHARE)
    if share != DEFAULT_PUBLIC_DOMAIN_SHARE:
        sets["public"] = _public_mix(data_cfg, doms, sets["public"], share, seed, seen)
    for set_name, items in sets.items():
        random.Random(f"lada-synthetic/{set_name}/{seed}").shuffle(items)  # mix domains
    return FederatedData(clients=clients, public=sets["public"], server_test=sets["server_test"],
                         server_train=sets["server_train"])


DEFAULT_PUBLIC_DOMAIN_SHARE = 0.5  # half of the public set is general, half client domains


def _extra(domain: str, n: int, seed: int, tag: str, seen: set[str], lo: int = 1, hi: int = 6,
           weights: Sequence[float] | None = None, task: str = "arith") -> list[Example]:
    """``n`` fresh problems of ``domain`` for a testbed option, from a stream of their own
    (ids ``syn-<domain>-<seed>-<tag><i>``), none repeating a question in ``seen`` (which
    grows by what is drawn)."""
    stream = {"test": 4_000_037, "public": 5_000_011}[tag] + seed
    out = [dataclasses.replace(ex, id=example_id(task, domain, seed, f"{tag}{i}"))
           for i, ex in enumerate(generate(domain, n, stream, lo, hi, step_weights=weights, exclude=seen,
                                           task=task))]
    seen.update(ex.question for ex in out)
    return out


def _public_mix(data_cfg: "DataConfig", doms: list[str], public: list[Example], share: float, seed: int,
                seen: set[str]) -> list[Example]:
    """The public set with ``share`` of client-domain questions (equal per domain) and the
    rest general. Fewer than the default's: the first ones of each part are kept. More:
    the default's plus fresh ones (``_extra``)."""
    n_dom = round(share * data_cfg.public_size)
    want = {"general": data_cfg.public_size - n_dom, **dict(zip(doms, _shares(n_dom, len(doms))))}
    by_domain: dict[str, list[Example]] = {}
    for ex in public:
        by_domain.setdefault(ex.domain, []).append(ex)
    out: list[Example] = []
    for d, n in want.items():
        have = by_domain.get(d, [])[:n]
        out += have + (_extra(d, n - len(have), seed, "public", seen,
                              task=getattr(data_cfg, "task", "arith")) if n > len(have) else [])
    return out


def tokenizer_corpus(data_cfg: "DataConfig", seed: int, per_domain: int = 400) -> list[str]:
    """Text for training every participant's tokenizer: it covers every domain's vocabulary.

    Client-domain problems appear as prompts only (question text, no rationale), drawn
    from a separate seed stream, so the operand values of the implicit facts never
    appear next to the words that imply them. General problems appear in full (prompt
    and target) so the calculator-line layout and digits are covered; general data
    holds no domain facts. Every fact noun and template word is listed once more so
    rare words still get tokens.
    """
    stream = seed + 1_000_003  # a seed the federation's own draws never use
    task = getattr(data_cfg, "task", "arith")  # the choice task adds options and choice lines
    texts: list[str] = []
    for ex in generate("general", per_domain, stream, task=task):
        texts.append(example_prompt(ex) + example_target(ex))
    for name in CLIENT_DOMAINS:
        for ex in generate(name, per_domain, stream, task=task):
            texts.append(example_prompt(ex))
    generated = [d for d in client_domains(data_cfg) if d not in DOMAINS]
    for name in generated:  # only configs that use generated domains see these texts
        for ex in generate(name, per_domain // 4, stream, task=task):
            texts.append(example_prompt(ex))
    words: set[str] = set(NAMES)
    for dom in [*_ALL, *(generated_domain(generated_index(d)) for d in generated)]:
        for templates in dom.explicit.values():
            words.update(t.format(name="", n="").strip() for t in templates)
        for template, table in dom.facts.values():
            words.update(table)
            words.add(template.format(name="", thing="").strip())
    texts.append("\n".join(sorted(words)))
    return texts
