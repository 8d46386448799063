"""The synthetic task: determinism, bounds, checkable rationales, domain facts, splits."""

from __future__ import annotations

import json
import re

import pytest

from lada.config import DataConfig
from lada.data.answers import check_steps, verify_path
from lada.data.records import example_target
from lada.data.synthetic import (CLIENT_DOMAINS, DOMAINS, MAX_VALUE, NAMES, build_synthetic, client_domains,
                                 domain_facts,
                                 federated_sizes, generate, tokenizer_corpus)

LINE = re.compile(r"^(\d+)([-+*/])(\d+)=<<\1\2\3=(\d+)>>\4$")


def test_domains_cover_general_and_at_least_four_client_domains():
    assert "general" in DOMAINS and "general" not in CLIENT_DOMAINS
    assert len(CLIENT_DOMAINS) >= 4
    assert {"shop", "farm", "travel"} <= set(CLIENT_DOMAINS)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_generate_is_deterministic_by_seed(domain):
    a, b, c = generate(domain, 40, seed=3), generate(domain, 40, seed=3), generate(domain, 40, seed=4)
    assert a == b
    assert [x.question for x in a] != [x.question for x in c]


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_rationales_check_and_values_stay_in_bounds(domain):
    for ex in generate(domain, 200, seed=0):
        target = example_target(ex)
        assert check_steps(target).all_ok, target
        assert verify_path(target, ex), target
        lines = ex.rationale.splitlines()
        start = int(LINE.match(lines[0]).group(1))
        assert 2 <= start <= 20
        prev = start
        for line in lines:
            m = LINE.match(line)
            assert m, line
            v, op, n, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert v == prev  # each step works on the running value
            assert (1 <= n <= 9) if op in "+-" else (2 <= n <= 5)
            if op == "/":
                assert v % n == 0
            assert 1 <= r <= MAX_VALUE
            prev = r
        assert ex.answer == str(prev)
        assert ex.answer_type == "number" and ex.source == "synthetic" and ex.domain == domain
        assert str(start) in ex.question.split()  # the start value is stated


def test_step_counts_within_bounds_and_configurable():
    exs = generate("general", 300, seed=1, min_steps=2, max_steps=4)
    assert {e.num_steps for e in exs} == {2, 3, 4}
    only_five = generate("shop", 30, seed=1, min_steps=5, max_steps=6, step_weights=[1, 0])
    assert {e.num_steps for e in only_five} == {5}
    with pytest.raises(ValueError, match="step_weights"):
        generate("shop", 3, seed=1, min_steps=1, max_steps=3, step_weights=[1, 1])
    with pytest.raises(ValueError, match="min_steps"):
        generate("shop", 3, seed=1, min_steps=0)
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate("space", 3, seed=1)


def test_general_chains_are_longer_than_client_chains():
    mean = lambda d: sum(e.num_steps for e in generate(d, 400, seed=0)) / 400
    assert mean("general") > mean("shop") + 0.3


def test_ids_unique_and_stable():
    exs = generate("farm", 50, seed=7)
    assert [e.id for e in exs] == [f"syn-farm-7-{i}" for i in range(50)]
    assert len({e.question for e in exs}) == 50


@pytest.mark.parametrize("domain", CLIENT_DOMAINS)
def test_every_domain_problem_needs_an_unstated_fact(domain):
    """Each client-domain problem has at least one step that only names a thing; its
    calculator line uses that thing's fact value, which the question never states."""
    dom = DOMAINS[domain]
    patterns = {op: re.compile(re.escape(t).replace(re.escape("{name}"), r"\w+").replace(re.escape("{thing}"), "(.+)") + "$")
                for op, (t, _) in dom.facts.items()}
    for ex in generate(domain, 100, seed=2):
        sentences = re.findall(r"[^.?]+[.?]", ex.question)[1:-1]  # drop the opening and the question
        lines = [LINE.match(l) for l in ex.rationale.splitlines()]
        assert len(sentences) == len(lines)
        fact_steps = 0
        for sentence, m in zip(sentences, lines):
            for op, pat in patterns.items():
                hit = pat.match(sentence.strip())
                if hit and m.group(2) == op:
                    assert int(m.group(3)) == dom.facts[op][1][hit.group(1)], (sentence, m.group(0))
                    assert not re.search(r"\d", sentence)
                    fact_steps += 1
        assert fact_steps >= 1, ex.question


def test_general_states_every_operand():
    for ex in generate("general", 100, seed=0):
        stated = re.findall(r"\d+", ex.question)
        operands = [LINE.match(l).group(3) for l in ex.rationale.splitlines()]
        assert stated[1:] == operands, ex  # first number is the start value


def _cfg(**kw) -> DataConfig:
    base = dict(num_clients=3, domains=["shop", "farm", "travel"], train_per_client=30, test_per_client=10,
                public_size=40, server_test_size=20, server_train_size=50)
    base.update(kw)
    return DataConfig(**base)


def test_build_synthetic_sizes_domains_and_disjointness():
    cfg = _cfg()
    fed = build_synthetic(cfg, seed=0)
    assert len(fed.clients) == 3
    for shard, dom in zip(fed.clients, cfg.domains):
        assert len(shard.train) == 30 and len(shard.test) == 10
        assert {e.domain for e in shard.train + shard.test} == {dom}
    assert len(fed.public) == 40 and len(fed.server_test) == 20 and len(fed.server_train) == 50
    assert {e.domain for e in fed.server_train} == {"general"}
    sizes = federated_sizes(cfg)
    assert sum(sizes["public"].values()) == 40 and sizes["public"]["general"] == 20
    for name, set_ in (("public", fed.public), ("server_test", fed.server_test)):
        assert {e.domain for e in set_} == {"general", *cfg.domains}
        for d, n in sizes[name].items():
            assert sum(e.domain == d for e in set_) == n
    everything = [e for s in fed.clients for e in s.train + s.test] + fed.public + fed.server_test + fed.server_train
    assert len({e.id for e in everything}) == len(everything)
    assert len({e.question for e in everything}) == len(everything)
    again = build_synthetic(cfg, seed=0)
    assert [e.id for e in again.public] == [e.id for e in fed.public]
    assert [e.question for e in build_synthetic(cfg, seed=1).public] != [e.question for e in fed.public]


def test_build_synthetic_rejects_bad_domains():
    with pytest.raises(ValueError, match="general"):
        build_synthetic(_cfg(domains=["shop", "farm", "general"]), seed=0)
    with pytest.raises(ValueError, match="own domain"):
        build_synthetic(_cfg(domains=["shop", "gen0", "gen0"]), seed=0)


def test_generated_domains_fill_clients_beyond_the_named_ones():
    cfg = _cfg(num_clients=30, train_per_client=5, test_per_client=3, public_size=60, server_test_size=31)
    doms = client_domains(cfg)
    assert doms[:3] == ["shop", "farm", "travel"] and doms[3:] == [f"gen{k}" for k in range(27)]
    fed = build_synthetic(cfg, seed=0)
    assert len(fed.clients) == 30
    for shard, dom in zip(fed.clients, doms):
        assert {e.domain for e in shard.train + shard.test} == {dom}
    assert {e.domain for e in fed.server_test} == {"general", *doms}
    # listed generated domains are skipped when filling
    assert client_domains(_cfg(num_clients=4, domains=["gen1", "shop"])) == ["gen1", "shop", "gen0", "gen2"]


def test_generated_domains_are_deterministic_and_have_their_own_facts():
    a, b = domain_facts("gen3"), domain_facts("gen3")
    assert a == b and domain_facts("gen4") != a
    tables = [domain_facts(f"gen{k}") for k in range(40)]
    assert len({json.dumps(t, sort_keys=True) for t in tables}) == 40
    for k in (0, 7, 39):
        dom = f"gen{k}"
        exs = generate(dom, 50, seed=0)
        assert exs == generate(dom, 50, seed=0) and exs != generate(dom, 50, seed=1)
        facts = domain_facts(dom)
        for ex in exs:  # every problem is consistent: its steps evaluate to the answer
            assert LINE.match(ex.rationale.splitlines()[-1]).group(4) == ex.answer
        # a fact step's operand is nowhere in the question
        used = [(op, t) for op, table in facts.items() for t in table if f" {t}." in " ".join(e.question for e in exs)]
        assert used


def test_bad_domains_are_config_errors_and_any_client_count_is_fine():
    from lada.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[data\].domains: each client needs its own domain"):
        DataConfig(num_clients=2, domains=["farm", "farm"]).validate_domains("[data]")
    with pytest.raises(ConfigError, match="not a synthetic client domain"):
        DataConfig(num_clients=2, domains=["shop", "moon"]).validate_domains("[data]")
    DataConfig(num_clients=12, domains=["shop"]).validate_domains("[data]")  # the rest are generated
    DataConfig(num_clients=5, domains=[]).validate_domains("[data]")
    assert client_domains(_cfg(num_clients=2)) == ["shop", "farm"]  # the first num_clients of the list


def test_tokenizer_corpus_covers_all_vocabulary_without_fact_examples():
    corpus = tokenizer_corpus(_cfg(), seed=0)
    text = "\n".join(corpus)
    words = set(re.findall(r"[A-Za-z]+", text))
    for dom in DOMAINS.values():
        for templates in dom.explicit.values():
            for t in templates:
                assert set(re.findall(r"[A-Za-z]+", t.replace("{name}", "").replace("{n}", ""))) <= words
        for template, table in dom.facts.values():
            for thing in table:
                assert set(thing.split()) <= words
    assert set(NAMES) <= words
    # client-domain problems appear as questions only: no worked steps next to domain words
    for chunk in corpus:
        if "<<" in chunk:
            assert not any(f" {t}." in chunk for d in CLIENT_DOMAINS for tbl in domain_facts(d).values() for t in tbl)
