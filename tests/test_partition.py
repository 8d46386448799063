"""Partitions: exact sizes, determinism by seed, disjointness, skew, clear errors."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lada.data as data_pkg
from lada.config import DataConfig
from lada.data import build_federated_data, tokenizer_corpus
from lada.data.partition import (
    ClientShard,
    FederatedData,
    PartitionError,
    label_proxy,
    partition_examples,
)
from lada.data.records import Example


def _examples(n_per_domain: dict[str, int], answer_type: str = "number") -> list[Example]:
    out = []
    for d, n in n_per_domain.items():
        for i in range(n):
            answer = {"number": str(i % 50), "yesno": "yes" if i % 3 else "no", "option": "ABCDE"[i % 5]}[answer_type]
            opts = ("A)1", "B)2", "C)3", "D)4", "E)5") if answer_type == "option" else ()
            out.append(Example(f"{d}-{i:04d}", f"q {d} {i}", "r", answer, answer_type, d, "test", opts))
    return out


SIZES = dict(num_clients=3, train_per_client=20, test_per_client=5, public_size=15, server_test_size=10,
             server_train_size=30)


def _ids(fd: FederatedData) -> dict[str, list[str]]:
    return {name: [ex.id for ex in xs] for name, xs in fd.named_sets().items()}


@pytest.mark.parametrize("mode", ["domain", "dirichlet", "iid"])
def test_sizes_disjoint_deterministic(mode):
    xs = _examples({"farm": 60, "shop": 60, "travel": 60, "zoo": 40})
    fd = partition_examples(xs, **SIZES, mode=mode, seed=3)
    assert [len(c.train) for c in fd.clients] == [20] * 3 and [len(c.test) for c in fd.clients] == [5] * 3
    assert (len(fd.public), len(fd.server_test), len(fd.server_train)) == (15, 10, 30)
    fd.check_disjoint()
    all_ids = [i for ids in _ids(fd).values() for i in ids]
    assert len(all_ids) == len(set(all_ids))
    # Same seed, same split, whatever the input order; another seed, another split.
    again = partition_examples(list(reversed(xs)), **SIZES, mode=mode, seed=3)
    assert _ids(again) == _ids(fd)
    other = partition_examples(xs, **SIZES, mode=mode, seed=4)
    assert _ids(other) != _ids(fd)


def test_domain_mode_private_data_stays_private():
    xs = _examples({"farm": 40, "shop": 40, "travel": 40, "zoo": 40})
    fd = partition_examples(xs, **SIZES, mode="domain", seed=0, client_domains=["travel", "farm", "shop"])
    for shard, dom in zip(fd.clients, ["travel", "farm", "shop"]):
        assert {ex.domain for ex in shard.train + shard.test} == {dom}
    private = {ex.id for c in fd.clients for ex in c.train + c.test}
    shared = [ex.id for ex in fd.public + fd.server_test + fd.server_train]
    assert not private & set(shared)
    # The shared sets mix domains (what is left of client domains and the rest).
    assert len({ex.domain for ex in fd.public + fd.server_test + fd.server_train}) >= 3


def test_default_domains_are_sorted():
    xs = _examples({"zoo": 30, "farm": 30, "shop": 30})
    fd = partition_examples(xs, **{**SIZES, "public_size": 5, "server_test_size": 5}, mode="domain", seed=0)
    assert [c.train[0].domain for c in fd.clients] == ["farm", "shop", "zoo"]


def test_server_train_takes_what_is_left():
    xs = _examples({"a": 100})
    fd = partition_examples(xs, 2, 20, 5, 10, 10, 1000, mode="iid", seed=0)
    assert len(fd.server_train) == 100 - 2 * 25 - 20
    fd = partition_examples(xs, 2, 20, 5, 10, 10, 0, mode="iid", seed=0)
    assert fd.server_train == []


def test_not_enough_data_says_how_many():
    xs = _examples({"a": 50})
    with pytest.raises(PartitionError, match=r"3 clients x \(20 train \+ 5 test\) \+ 15 public \+ 10 server test = 100 needed, 50 available"):
        partition_examples(xs, **SIZES, mode="iid")
    xs = _examples({"farm": 10, "shop": 100, "travel": 100})
    with pytest.raises(PartitionError, match="client 0 needs 25 examples of domain 'farm', only 10 available"):
        partition_examples(xs, **SIZES, mode="domain")


def test_domain_mode_errors():
    xs = _examples({"general": 300})
    with pytest.raises(PartitionError, match="3 clients need 3 domains.*dirichlet"):
        partition_examples(xs, **SIZES, mode="domain")
    xs = _examples({"farm": 100, "shop": 100, "travel": 100})
    with pytest.raises(PartitionError, match=r"no examples of domain\(s\) \['moon'\]"):
        partition_examples(xs, **SIZES, mode="domain", client_domains=["farm", "moon", "shop"])
    with pytest.raises(PartitionError, match="unknown partition mode"):
        partition_examples(xs, **SIZES, mode="random")


def test_duplicate_ids_rejected():
    xs = _examples({"a": 200})
    with pytest.raises(PartitionError, match="duplicate example id"):
        partition_examples(xs + xs[:1], **SIZES, mode="iid")


def test_repeated_questions_are_dropped_with_a_warning(caplog):
    xs = _examples({"a": 120})
    twin = Example("b-0000", "  Q A 7 ", "r", "7", "number", "a")  # same question as a-0007 up to case/spaces
    with caplog.at_level("WARNING", logger="lada.data.partition"):
        fd = partition_examples(xs + [twin], 2, 20, 5, 20, 10, 1000, mode="iid", seed=0)
    assert "b-0000" not in {ex.id for xs_ in fd.named_sets().values() for ex in xs_}
    assert sum(fd.sizes().values()) == 120
    assert any("dropping b-0000: same question as a-0007" in r.getMessage() for r in caplog.records)
    fd.public.append(twin)
    fd.check_disjoint()  # ids are still distinct ...
    with pytest.raises(PartitionError, match="ask the same question"):
        fd.check_disjoint(by_question=True)  # ... but the question leaks


def test_check_disjoint_catches_leaks():
    xs = _examples({"a": 10})
    fd = FederatedData([ClientShard(xs[:3], xs[3:5]), ClientShard(xs[5:7], xs[7:8])], public=[xs[8], xs[1]],
                       server_test=[xs[9]], server_train=[])
    with pytest.raises(PartitionError, match=r"'a-0001' is in both client0.train and public"):
        fd.check_disjoint()
    fd.public = [xs[8]]
    fd.check_disjoint()
    fd.server_train = [xs[6]]
    with pytest.raises(PartitionError, match="client1.train and server_train"):
        fd.check_disjoint()


def test_label_proxy():
    assert set(label_proxy(_examples({"a": 5, "b": 5}))) == {"a", "b"}
    assert set(label_proxy(_examples({"a": 20}, "yesno"))) == {"yesno:yes", "yesno:no"}
    assert set(label_proxy(_examples({"a": 20}, "option"))) == {f"option:{c}" for c in "ABCDE"}
    labels = label_proxy(_examples({"a": 100}))
    assert len(set(labels)) == 5 and max(Counter(labels).values()) <= 30  # quantile buckets are balanced


def test_dirichlet_skews_clients():
    xs = _examples({"general": 600}, "option")
    sizes = dict(SIZES, train_per_client=80, test_per_client=20)
    skewed = partition_examples(xs, **sizes, mode="dirichlet", alpha=0.1, seed=1)
    flat = partition_examples(xs, **sizes, mode="dirichlet", alpha=1000.0, seed=1)

    def top_share(fd):  # mean share of each client's most common answer letter
        return sum(max(Counter(ex.answer for ex in c.train + c.test).values()) / 100 for c in fd.clients) / 3

    assert top_share(skewed) > 0.5 > top_share(flat)
    assert top_share(flat) < 0.35


@given(st.integers(0, 2**32 - 1), st.sampled_from(["domain", "dirichlet", "iid"]), st.floats(0.05, 10))
@settings(max_examples=25, deadline=None)
def test_partition_property(seed, mode, alpha):
    xs = _examples({"farm": 40, "shop": 40, "travel": 40})
    fd = partition_examples(xs, 3, 10, 4, 12, 8, 100, mode=mode, alpha=alpha, seed=seed)
    fd.check_disjoint()
    assert sum(fd.sizes().values()) == len(xs)  # server_train took all that was left


# ----------------------------------------------------------------------------- from a config


def test_build_federated_data_from_file_source(monkeypatch):
    data_pkg.clear_cache()
    cfg = DataConfig(source="strategyqa", partition="dirichlet", num_clients=2, train_per_client=30,
                     test_per_client=10, public_size=20, server_test_size=10, server_train_size=50)
    fd = build_federated_data(cfg, seed=0)
    assert fd.sizes() == {"client0.train": 30, "client0.test": 10, "client1.train": 30, "client1.test": 10,
                          "public": 20, "server_test": 10, "server_train": 50}
    fd.public.clear()  # callers get copies: the cache is untouched
    again = build_federated_data(cfg, seed=0)
    assert len(again.public) == 20 and [e.id for e in again.server_test] == [e.id for e in fd.server_test]
    assert [e.id for e in build_federated_data(cfg, seed=1).server_test] != [e.id for e in fd.server_test]
    # File data without domains cannot be split by domain; the error names the source.
    with pytest.raises(PartitionError, match="source 'strategyqa'.*dirichlet"):
        build_federated_data(DataConfig(source="strategyqa", partition="domain"), seed=0)


def test_build_federated_data_synthetic_is_delegated(monkeypatch):
    import lada.data.synthetic as synthetic

    data_pkg.clear_cache()
    sentinel = FederatedData([], [], [], [])
    calls = []
    monkeypatch.setattr(synthetic, "build_synthetic", lambda cfg, seed: calls.append(seed) or sentinel)
    cfg = DataConfig(source="synthetic")
    build_federated_data(cfg, 7)
    build_federated_data(cfg, 7)
    assert calls == [7]  # cached by (config, seed)
    data_pkg.clear_cache()


def test_tokenizer_corpus_file_source():
    cfg = DataConfig(source="aqua")
    texts = tokenizer_corpus(cfg, seed=0, max_chars=20_000)
    assert texts and sum(map(len, texts)) <= 20_000
    assert all(t.startswith("Question: ") and "Options: A)" in t and "\n#### " in t for t in texts)
    assert texts == tokenizer_corpus(cfg, seed=0, max_chars=20_000)
    assert len(tokenizer_corpus(cfg, seed=0)) == 508  # everything fits under the default cap
