"""Task 2 ([data] task = "yesno"): the arithmetic chains asked "... Is the answer even?".
Determinism, balance, checkable parity lines, disjoint federations, the loader, sampled
paths, config."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lada.config import DataConfig, load_config
from lada.data.answers import check_steps, final_step, is_correct, verify_path
from lada.data.loaders import load_jsonl
from lada.data.records import PARITY_QUESTION, asks_parity, example_target
from lada.data.split import data_fingerprint
from lada.data.synthetic import base_question, build_synthetic, generate, tokenizer_corpus

from helpers import sampled_task_paths

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = dict(seed=0, train_per_client=40, test_per_client=20, public_size=30, server_test_size=20,
             server_train_size=50)


@pytest.mark.parametrize("domain", ["general", "farm", "gen1"])
def test_yesno_problems_are_the_arith_chains_with_a_parity_line(domain):
    a, b = generate(domain, 80, seed=3, task="yesno"), generate(domain, 80, seed=3, task="yesno")
    assert a == b and a != generate(domain, 80, seed=4, task="yesno")
    for ex, base in zip(a, generate(domain, 80, seed=3)):
        value = int(base.answer)
        assert ex.id == base.id.replace("syn-", "syn-yesno-", 1) and ex.answer_type == "yesno"
        assert ex.question == f"{base.question} {PARITY_QUESTION}" and base_question(ex.question) == base.question
        assert asks_parity(ex.question) and not asks_parity(base.question)
        assert ex.answer == ("yes" if value % 2 == 0 else "no")
        assert ex.rationale == f"{base.rationale}\n{value} is {'even' if value % 2 == 0 else 'odd'}"
        assert ex.num_steps == base.num_steps  # the parity line is not a reasoning step
        assert verify_path(example_target(ex), ex)
        assert check_steps(example_target(ex), parity=True).parity == ex.answer


@pytest.mark.parametrize("domain", ["general", "shop"])
def test_yes_and_no_are_about_balanced(domain):
    exs = generate(domain, 3000, seed=0, task="yesno")
    assert 0.45 < sum(ex.answer == "yes" for ex in exs) / len(exs) < 0.6


EX = next(ex for ex in generate("shop", 20, seed=0, task="yesno") if ex.num_steps >= 2)


def _path(link: str | None = None, answer: str | None = None, steps: list[str] | None = None) -> str:
    """The gold path with its parity line (``""``: none), answer or steps replaced."""
    lines = EX.rationale.splitlines()
    link = lines[-1] if link is None else link
    return "\n".join([*(steps or lines[:-1]), *([link] if link else []), f"#### {answer or EX.answer}"])


def test_yesno_paths_good_and_every_kind_of_wrong():
    lines = EX.rationale.splitlines()
    value = int(lines[-1].split()[0])
    other = "no" if EX.answer == "yes" else "yes"
    good = _path()
    assert verify_path(good, EX) and check_steps(good, parity=True).n_checked == EX.num_steps + 1
    # the answer line contradicts the (right) parity line
    said_other = _path(answer=other)
    assert not verify_path(said_other, EX)
    assert check_steps(said_other, parity=True).first_wrong_line == EX.num_steps + 1
    # a false parity line, answered consistently
    false = f"{value} is {'odd' if EX.answer == 'yes' else 'even'}"
    assert not check_steps(_path(false, other), parity=True).all_ok
    # a true parity line about another number, with the right answer
    assert is_correct(_path(f"{value + 2} {lines[-1].split(' ', 1)[1]}"), EX.answer, "yesno")
    assert not verify_path(_path(f"{value + 2} {lines[-1].split(' ', 1)[1]}"), EX)
    # no parity line: the right word alone is not a verified path
    assert is_correct(_path(""), EX.answer, "yesno") and not verify_path(_path(""), EX)
    # a broken calculator note
    broken = [lines[0].replace(">>", "1>>", 1), *lines[1:-1]]
    assert not verify_path(_path(steps=broken), EX)
    # a wrong chain whose (wrong) value has the right parity, stated rightly
    last = lines[-2]
    v = int(last.rsplit(">>", 1)[1])
    w = v + 2
    wrong_chain = [*lines[:-2], last.replace(f"={v}>>{v}", f"={w}>>{w}")]
    assert not verify_path(_path(f"{w} {lines[-1].split(' ', 1)[1]}", steps=wrong_chain), EX)


def test_parity_lines_are_unchecked_unless_the_question_asks():
    text = "3+4=<<3+4=7>>7\n7 is even\n#### yes"
    plain = check_steps(text)
    assert plain.all_ok and plain.n_steps == 1 and plain.n_checked == 1 and plain.parity is None
    assert not check_steps(text, parity=True).all_ok  # 7 is odd
    assert check_steps("3+4=<<3+4=7>>7\n7 is odd\n#### no", parity=True).all_ok
    assert not check_steps("3+4=<<3+4=7>>7\n9 is odd\n#### no", parity=True).all_ok  # not the chain's value
    # a number-answer path with a line that looks like a parity line is read as before
    assert check_steps("3+4=<<3+4=7>>7\n7 is odd\n#### 7").all_ok


def test_final_step_on_yesno_separates_the_chain_from_the_parity():
    lines = EX.rationale.splitlines()
    other = "no" if EX.answer == "yes" else "yes"
    outputs = [example_target(EX), "\n".join([*lines[:-1], f"#### {other}"]), f"#### {EX.answer}"]
    assert final_step(outputs, [EX] * 3) == (3, 2, 1)


def test_yesno_federation_keeps_every_problem_once():
    cfg = DataConfig(**SMALL, task="yesno", client_test_steps=[4, 6], public_domain_share=0.8,
                     client_test_general_share=0.5)
    fed, base = build_synthetic(cfg, 0), build_synthetic(DataConfig(**SMALL), 0)
    fed.check_disjoint()
    sets = fed.named_sets()
    # the extra draws exclude the pools' problems by their arithmetic question, not the asked one
    bases = [base_question(ex.question) for xs in sets.values() for ex in xs]
    assert len(bases) == len(set(bases))
    assert all(ex.answer_type == "yesno" and ex.id.startswith("syn-yesno-") for xs in sets.values() for ex in xs)
    assert [base_question(ex.question) for ex in fed.clients[0].train] == [ex.question for ex in base.clients[0].train]


def test_yesno_examples_round_trip_through_the_jsonl_loader(tmp_path):
    exs = generate("travel", 20, seed=2, task="yesno")
    f = tmp_path / "yesno.jsonl"
    keys = ("id", "question", "rationale", "answer", "answer_type", "domain")
    f.write_text("".join(json.dumps({k: v for k, v in ex.to_dict().items() if k in keys}) + "\n" for ex in exs))
    back = load_jsonl(f)
    assert [(b.question, b.answer, b.rationale) for b in back] == [(e.question, e.answer, e.rationale) for e in exs]
    assert all(verify_path(example_target(b), b) for b in back)


def test_tokenizer_corpus_and_configs_cover_the_yesno_task():
    text = "\n".join(tokenizer_corpus(DataConfig(**SMALL, task="yesno"), 0))
    assert re.search(r"Is the answer even\?\nAnswer:", text) and re.search(r"\n\d+ is (even|odd)\n#### (yes|no)", text)
    assert data_fingerprint(DataConfig(seed=0, task="yesno"), 0) != data_fingerprint(DataConfig(seed=0, task="choice"), 0)
    assert load_config(CONFIGS / "task2.toml").data.task == "yesno"


def test_paths_sampled_from_a_model_are_verified_by_their_parity_lines(tmp_path):
    # the paths a memorising d32 model samples, verified like any run's (tests/helpers.py)
    for c, ex in sampled_task_paths("yesno", tmp_path):
        assert c.verified == verify_path(c.text, ex) and c.steps == check_steps(c.text).n_steps
        if c.verified:
            assert check_steps(c.text, parity=True).parity == ex.answer
            # the same path for the opposite gold answer: its parity line no longer agrees
            flipped = dataclasses.replace(ex, answer="no" if ex.answer == "yes" else "yes")
            assert not verify_path(c.text, flipped)
