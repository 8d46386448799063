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
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from lada.data.records import Example, example_prompt, example_target

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


def domain_facts(domain: str) -> dict[str, dict[str, int]]:
    """The implicit facts of a domain as {op: {thing: operand}} (empty for general)."""
    return {op: dict(table) for op, (_, table) in _domain(domain).facts.items()}


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {name!r}; known: {sorted(DOMAINS)}")
    return DOMAINS[name]


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
             step_weights: Sequence[float] | None = None, exclude: set[str] | None = None) -> list[Example]:
    """``n`` distinct problems of one domain, deterministic by (domain, n, seed, steps).

    ``step_weights`` (one weight per step count in min..max) overrides the domain's
    default distribution (general: uniform; client domains: skewed towards short).
    Questions already in ``exclude`` are skipped, so callers can keep sets disjoint.
    """
    dom = _domain(domain)
    rng = random.Random(f"lada-synthetic/{domain}/{seed}/{min_steps}-{max_steps}")
    seen = set(exclude or ())
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
    return out


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


def _client_domains(data_cfg: "DataConfig") -> list[str]:
    doms = list(data_cfg.domains)
    if len(doms) != data_cfg.num_clients:
        raise ValueError(f"data.domains has {len(doms)} entries but data.num_clients = {data_cfg.num_clients}")
    for d in doms:
        if d not in CLIENT_DOMAINS:
            raise ValueError(f"data.domains: {d!r} is not a synthetic client domain; choose from {CLIENT_DOMAINS}")
    if len(set(doms)) != len(doms):
        raise ValueError(f"data.domains: each client needs its own domain, got {doms}")
    return doms


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
    pools = {d: generate(d, n, seed) for d, n in need.items()}
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
        random.Random(f"lada-synthetic/{set_name}/{seed}").shuffle(items)  # mix domains
        sets[set_name] = items
    return FederatedData(clients=clients, public=sets["public"], server_test=sets["server_test"],
                         server_train=sets["server_train"])


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
    texts: list[str] = []
    for ex in generate("general", per_domain, stream):
        texts.append(example_prompt(ex) + example_target(ex))
    for name in CLIENT_DOMAINS:
        for ex in generate(name, per_domain, stream):
            texts.append(example_prompt(ex))
    words: set[str] = set(NAMES)
    for dom in _ALL:
        for templates in dom.explicit.values():
            words.update(t.format(name="", n="").strip() for t in templates)
        for template, table in dom.facts.values():
            words.update(table)
            words.add(template.format(name="", thing="").strip())
    texts.append("\n".join(sorted(words)))
    return texts
