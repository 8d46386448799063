"""Splitting examples into client shards, the public set and the server's held-out sets.

Private data never leaves a client, so the sets must be disjoint: every partition is
checked with ``FederatedData.check_disjoint`` before it is returned. Partitions depend
only on the examples (not their order) and the seed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lada.data.records import Example

log = logging.getLogger(__name__)

MODES = ("domain", "dirichlet", "iid")


class PartitionError(ValueError):
    """The data cannot be split as asked (too few examples, missing domains, overlap)."""


@dataclass
class ClientShard:
    """One client's private data: what it trains on and what it is evaluated on."""

    train: list[Example]
    test: list[Example]


@dataclass
class FederatedData:
    """Everything a federation needs: client shards, the public set (questions every node
    may see), the server's test set and the server's warm-up data."""

    clients: list[ClientShard]
    public: list[Example]
    server_test: list[Example]
    server_train: list[Example] = field(default_factory=list)

    def named_sets(self) -> dict[str, list[Example]]:
        sets = {}
        for k, shard in enumerate(self.clients):
            sets[f"client{k}.train"] = shard.train
            sets[f"client{k}.test"] = shard.test
        sets.update(public=self.public, server_test=self.server_test, server_train=self.server_train)
        return sets

    def sizes(self) -> dict[str, int]:
        return {name: len(xs) for name, xs in self.named_sets().items()}

    def check_disjoint(self, by_question: bool = False) -> None:
        """Raise PartitionError if an example id (or, with ``by_question``, a question
        text) is in two sets or twice in one."""
        where: dict[str, str] = {}
        texts: dict[str, tuple[str, str]] = {}
        for name, xs in self.named_sets().items():
            for ex in xs:
                if ex.id in where:
                    raise PartitionError(f"example {ex.id!r} is in both {where[ex.id]} and {name}")
                where[ex.id] = name
                if by_question:
                    q = question_key(ex)
                    if q in texts:
                        other_id, other_set = texts[q]
                        raise PartitionError(f"examples {other_id!r} ({other_set}) and {ex.id!r} ({name}) "
                                             f"ask the same question")
                    texts[q] = (ex.id, name)


def question_key(ex: Example) -> str:
    """Question text up to case and spacing (and options): what makes two examples the same."""
    return " ".join(ex.question.lower().split()) + "|" + "|".join(ex.options)


def drop_duplicate_questions(examples: list[Example]) -> list[Example]:
    """Keep the first example (by id) of each question; the source data can repeat a
    record under two ids (StrategyQA does once), which would leak across sets."""
    seen: dict[str, str] = {}
    out = []
    for ex in sorted(examples, key=lambda e: e.id):
        key = question_key(ex)
        if key in seen:
            log.warning("dropping %s: same question as %s", ex.id, seen[key])
            continue
        seen[key] = ex.id
        out.append(ex)
    return out


def label_proxy(examples: list[Example], n_buckets: int = 5) -> list[str]:
    """A label per example for Dirichlet skew: the domain when there are several,
    otherwise the answer (yes/no, option letter) or, for numbers, a quantile bucket of
    the answer value."""
    if len({ex.domain for ex in examples}) > 1:
        return [ex.domain for ex in examples]
    labels = [f"{ex.answer_type}:{ex.answer}" for ex in examples]
    numeric = [i for i, ex in enumerate(examples) if ex.answer_type == "number"]
    if numeric:
        values = np.array([float(examples[i].answer) for i in numeric])
        edges = np.quantile(values, np.arange(1, n_buckets) / n_buckets)
        buckets = np.searchsorted(edges, values, side="right")
        for i, b in zip(numeric, buckets):
            labels[i] = f"number:q{int(b)}"
    return labels


def partition_examples(
    examples: list[Example],
    num_clients: int,
    train_per_client: int,
    test_per_client: int,
    public_size: int,
    server_test_size: int,
    server_train_size: int,
    mode: str = "domain",
    alpha: float = 0.5,
    seed: int = 0,
    client_domains: list[str] | None = None,
) -> FederatedData:
    """Split ``examples`` into ``num_clients`` private shards, a public set, a server test
    set and server training data (which takes what is left, up to its size). Examples
    that repeat an earlier question (same text up to case and spacing) are dropped first,
    with a warning, so no question can appear in two sets.

    - ``domain``: client k's train and test come from domain k (``client_domains``, or the
      sorted distinct domains); the shared sets come from everything else, all domains mixed.
    - ``dirichlet``: client k draws label proportions from Dirichlet(alpha) over
      ``label_proxy`` labels and samples its shard accordingly (smaller alpha: more skew).
    - ``iid``: uniform random shards.
    """
    if mode not in MODES:
        raise PartitionError(f"unknown partition mode {mode!r}; known: {MODES}")
    for name, v in (("num_clients", num_clients), ("train_per_client", train_per_client),
                    ("test_per_client", test_per_client), ("public_size", public_size),
                    ("server_test_size", server_test_size), ("server_train_size", server_train_size)):
        if v < 0 or (name == "num_clients" and v == 0):
            raise PartitionError(f"{name} must be {'> 0' if name == 'num_clients' else '>= 0'}, got {v}")
    if mode == "dirichlet" and alpha <= 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
    ids = Counter(ex.id for ex in examples)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise PartitionError(f"{len(dup)} duplicate example id(s), e.g. {dup[0]!r}")

    examples = drop_duplicate_questions(examples)
    per_client = train_per_client + test_per_client
    needed = num_clients * per_client + public_size + server_test_size
    if needed > len(examples):
        raise PartitionError(
            f"not enough examples: {num_clients} clients x ({train_per_client} train + {test_per_client} test)"
            f" + {public_size} public + {server_test_size} server test = {needed} needed, {len(examples)} available")

    rng = np.random.default_rng(seed)
    pool = sorted(examples, key=lambda ex: ex.id)  # independent of input order
    if mode == "domain":
        shards, rest = _domain_shards(pool, num_clients, per_client, client_domains, rng)
    elif mode == "dirichlet":
        shards, rest = _dirichlet_shards(pool, num_clients, per_client, alpha, rng)
    else:
        pool = _shuffled(pool, rng)
        shards = [pool[k * per_client:(k + 1) * per_client] for k in range(num_clients)]
        rest = pool[num_clients * per_client:]

    rest = _shuffled(sorted(rest, key=lambda ex: ex.id), rng)
    clients = []
    for shard in shards:
        shard = _shuffled(shard, rng)
        clients.append(ClientShard(train=shard[:train_per_client], test=shard[train_per_client:]))
    a, b = public_size, public_size + server_test_size
    data = FederatedData(clients, public=rest[:a], server_test=rest[a:b], server_train=rest[b:b + server_train_size])
    data.check_disjoint(by_question=True)
    return data


def _shuffled(xs: list[Example], rng: np.random.Generator) -> list[Example]:
    return [xs[i] for i in rng.permutation(len(xs))]


def _domain_shards(pool: list[Example], num_clients: int, per_client: int, client_domains: list[str] | None,
                   rng: np.random.Generator) -> tuple[list[list[Example]], list[Example]]:
    present = sorted({ex.domain for ex in pool})
    domains = list(client_domains) if client_domains else present
    if len(domains) < num_clients:
        raise PartitionError(
            f"domain partition: {num_clients} clients need {num_clients} domains, got {len(domains)} "
            f"({', '.join(domains)}); use partition 'dirichlet' or 'iid' for data without domain labels")
    domains = domains[:num_clients]
    if len(set(domains)) < len(domains):
        raise PartitionError(f"domain partition: client domains repeat: {domains}")
    missing = [d for d in domains if d not in present]
    if missing:
        raise PartitionError(f"domain partition: no examples of domain(s) {missing}; data has {present}")
    by_domain = {d: _shuffled([ex for ex in pool if ex.domain == d], rng) for d in domains}
    shards, rest = [], [ex for ex in pool if ex.domain not in by_domain]
    for k, d in enumerate(domains):
        group = by_domain[d]
        if len(group) < per_client:
            raise PartitionError(f"domain partition: client {k} needs {per_client} examples of domain {d!r}, "
                                 f"only {len(group)} available")
        shards.append(group[:per_client])
        rest += group[per_client:]
    return shards, rest


def _dirichlet_shards(pool: list[Example], num_clients: int, per_client: int, alpha: float,
                      rng: np.random.Generator) -> tuple[list[list[Example]], list[Example]]:
    labels = label_proxy(pool)
    names = sorted(set(labels))
    by_label = {name: [] for name in names}
    for ex, lab in zip(pool, labels):
        by_label[lab].append(ex)
    queues = [_shuffled(by_label[name], rng) for name in names]
    left = np.array([len(q) for q in queues], dtype=float)
    shards = []
    for _ in range(num_clients):
        p = rng.dirichlet(np.full(len(names), alpha))
        shard = []
        for _ in range(per_client):
            # Sample a label from this client's proportions among labels not yet used up.
            w = p * (left > 0)
            w = w / w.sum() if w.sum() > 0 else (left > 0) / (left > 0).sum()
            j = int(rng.choice(len(names), p=w))
            shard.append(queues[j].pop())
            left[j] -= 1
        shards.append(shard)
    rest = [ex for q in queues for ex in q]
    return shards, rest
