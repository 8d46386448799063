"""The multiple-choice task ([data] task = "choice"): the arithmetic chains as five-option
multiple choice. Determinism, checkable choice lines, ids and disjointness, config errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest

from lada.config import SYNTHETIC_TASKS, ConfigError, DataConfig, load_config
from lada.data.answers import check_steps, is_correct, verify_path
from lada.data.loaders import DataFormatError, load_jsonl
from lada.data.records import example_prompt, example_target
from lada.data.split import data_fingerprint
from lada.data.synthetic import TASKS, build_synthetic, generate, tokenizer_corpus
from lada.data.synthetic import CHOICE_LETTERS as LETTERS

from helpers import sampled_task_paths

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = dict(seed=0, train_per_client=40, test_per_client=20, public_size=30, server_test_size=20,
             server_train_size=50)


def _value(option: str) -> int:
    return int(option.split(" (", 1)[0])


@pytest.mark.parametrize("domain", ["general", "shop", "gen2"])
def test_choice_problems_are_the_arith_chains_deterministic_by_seed(domain):
    a, b = generate(domain, 60, seed=3, task="choice"), generate(domain, 60, seed=3, task="choice")
    assert a == b and a != generate(domain, 60, seed=4, task="choice")
    arith = generate(domain, 60, seed=3)
    for ex, base in zip(a, arith):
        # same question and calculator lines; options A-E; the right one holds the arith answer
        assert ex.id == base.id.replace("syn-", "syn-choice-", 1) and ex.question == base.question
        assert ex.answer_type == "option" and ex.answer in LETTERS and ex.domain == domain
        assert ex.rationale.splitlines()[:-1] == base.rationale.splitlines()
        assert ex.rationale.splitlines()[-1] == f"{base.answer} ({ex.answer})"
        assert f"{base.answer} ({ex.answer})" in ex.options  # the choice line repeats the option as listed
        values = [_value(o) for o in ex.options]
        assert [o[-2] for o in ex.options] == list(LETTERS) and len(set(values)) == 5 and min(values) >= 1
        assert values[LETTERS.index(ex.answer)] == int(base.answer)
        assert ex.num_steps == base.num_steps  # the choice line is not a reasoning step
        assert verify_path(example_target(ex), ex) and check_steps(example_target(ex), ex.options).choice == ex.answer
        assert f"Options: {ex.options[0]} " in example_prompt(ex) and ex.options[0].endswith(" (A)")


def test_answer_letters_and_ranks_are_spread():
    exs = generate("general", 400, seed=0, task="choice") + generate("shop", 400, seed=0, task="choice")
    letters = collections.Counter(ex.answer for ex in exs)
    ranks = collections.Counter(sorted(_value(o) for o in ex.options).index(_value(ex.options[LETTERS.index(ex.answer)]))
                                for ex in exs)
    assert all(0.13 < letters[L] / len(exs) < 0.27 for L in LETTERS), letters
    assert all(0.10 < ranks[r] / len(exs) < 0.32 for r in range(5)), ranks  # no "middle value" shortcut


def test_most_problems_offer_the_chain_stopped_a_step_early():
    # where the drawn rank allows it (about 80%), a wrong option is the value before the last step
    exs = generate("farm", 200, seed=1, task="choice")
    early = [int(re.match(r"\d+", ex.rationale.splitlines()[-2]).group()) in [_value(o) for o in ex.options]
             for ex in exs]
    assert sum(early) / len(exs) > 0.7


EX = generate("shop", 5, seed=0, task="choice")[2]


def _path(choice_value: str | None = None, letter: str | None = None, answer: str | None = None,
          break_step: bool = False) -> str:
    lines = EX.rationale.splitlines()
    value, chosen = lines[-1].split()[0], lines[-1].split()[-1].strip("()")
    steps = lines[:-1]
    if break_step:
        steps[0] = steps[0].replace(">>", "1>>", 1)
    choice = f"{choice_value or value} ({letter or chosen})"
    return "\n".join([*steps, choice, f"#### {answer or chosen}"])


def _wrong_letter() -> str:
    return next(L for L in LETTERS if L != EX.answer)


def test_choice_paths_good_wrong_answer_and_broken_steps():
    good = _path()
    assert verify_path(good, EX) and check_steps(good, EX.options).n_checked == EX.num_steps + 1
    wrong = _wrong_letter()
    wrong_value = str(_value(EX.options[LETTERS.index(wrong)]))
    # the answer line names another option: wrong answer, and it contradicts the choice line
    bad_answer = _path(answer=wrong)
    assert not is_correct(bad_answer, EX.answer, "option", EX.options) and not verify_path(bad_answer, EX)
    assert check_steps(bad_answer, EX.options).first_wrong_line == EX.num_steps + 1
    # a broken calculator note: the right letter is not enough
    broken = _path(break_step=True)
    assert is_correct(broken, EX.answer, "option", EX.options) and not verify_path(broken, EX)
    assert check_steps(broken, EX.options).first_wrong_line == 1
    # a choice line whose value is not the option it names
    assert not check_steps(_path(letter=wrong), EX.options).all_ok
    # a choice line naming another option's value: not the chain's result
    off = check_steps(_path(choice_value=wrong_value, letter=wrong, answer=wrong), EX.options)
    assert not off.all_ok and off.first_wrong_line == EX.num_steps + 1
    # an option letter that does not exist
    assert not check_steps(_path(letter="F"), EX.options).all_ok


def test_a_right_letter_without_the_choice_line_or_after_a_wrong_chain_is_not_verified():
    lines = EX.rationale.splitlines()
    no_choice = "\n".join([*lines[:-1], f"#### {EX.answer}"])
    assert is_correct(no_choice, EX.answer, "option", EX.options) and not verify_path(no_choice, EX)
    # the chain ends elsewhere, the letter is the gold one: the choice line cannot be consistent
    last = lines[-2]
    v = int(last.rsplit(">>", 1)[1])
    wrong_chain = "\n".join([*lines[:-2], last.replace(f"={v}>>{v}", f"={v + 1}>>{v + 1}"),
                             f"{v + 1} ({EX.answer})", f"#### {EX.answer}"])
    assert not verify_path(wrong_chain, EX)
    # the answer stated as the option's value maps to its letter and stays consistent
    by_value = _path(answer=lines[-1].split()[0])
    assert verify_path(by_value, EX)


def test_choice_lines_are_unchecked_without_options_and_number_answers_unchanged():
    text = "3+4=<<3+4=7>>7\n9 (B)\n#### B"
    assert check_steps(text).all_ok and check_steps(text).n_checked == 1 and check_steps(text).n_steps == 1
    assert not check_steps(text, ("7 (A)", "9 (B)")).all_ok  # 9 is not the chain's result
    assert check_steps("3+4=<<3+4=7>>7\n7 (A)\n#### A", ("7 (A)", "9 (B)")).all_ok
    # options labelled letter first (the AQuA style) are read the same way
    assert check_steps("3+4=<<3+4=7>>7\n7 (A)\n#### A", ("A)7", "B)9")).all_ok


def test_choice_examples_round_trip_through_the_jsonl_loader(tmp_path):
    # the value-first labels ("4 (A)") are labels to the loader: kept as they are, not relabelled
    exs = generate("farm", 20, seed=2, task="choice")
    f = tmp_path / "choice.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in ex.to_dict().items()
                                     if k in ("id", "question", "rationale", "answer", "answer_type", "domain", "options")}) + "\n"
                         for ex in exs))
    back = load_jsonl(f)
    assert [b.options for b in back] == [ex.options for ex in exs]
    assert all(verify_path(example_target(b), b) for b in back)
    f.write_text(json.dumps({"question": "q", "rationale": "", "answer": "A", "answer_type": "option",
                             "options": ["4 (A)", "5 (C)"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"options\[1\].*label 'C' is out of order"):
        load_jsonl(f)


def test_choice_federation_is_disjoint_with_choice_ids_and_the_arith_questions():
    fed = build_synthetic(DataConfig(**SMALL, task="choice"), 0)
    base = build_synthetic(DataConfig(**SMALL), 0)
    fed.check_disjoint()
    for name, xs in fed.named_sets().items():
        olds = base.named_sets()[name]
        assert all(ex.id.startswith("syn-choice-") and ex.answer_type == "option" for ex in xs), name
        assert [ex.question for ex in xs] == [ex.question for ex in olds], name
    opts = build_synthetic(DataConfig(**SMALL, task="choice", client_test_steps=[4, 6], public_domain_share=0.8,
                                      client_test_general_share=0.5), 0)
    opts.check_disjoint()
    assert opts.clients[0].test[0].id == "syn-choice-shop-0-test0"
    assert all(ex.answer_type == "option" for xs in opts.named_sets().values() for ex in xs)


def test_tokenizer_corpus_covers_the_choice_format():
    text = "\n".join(tokenizer_corpus(DataConfig(**SMALL, task="choice"), 0))
    assert re.search(r"Options: \d+ \(A\) \d+ \(B\)", text) and re.search(r"\n\d+ \([A-E]\)\n#### [A-E]", text)


def test_task_config_default_and_errors(tmp_path):
    assert DataConfig().task == "arith" and TASKS == SYNTHETIC_TASKS
    # a written split of one task is never reused for the other
    assert data_fingerprint(DataConfig(seed=0, task="choice"), 0) != data_fingerprint(DataConfig(seed=0), 0)
    p = tmp_path / "c.toml"
    p.write_text((CONFIGS / "tiny-test.toml").read_text().replace('source = "synthetic"', 'source = "synthetic"\ntask = "truefalse"'))
    with pytest.raises(ConfigError, match=r"c\.toml.*\[data\]\.task: must be one of \('arith', 'yesno', 'choice'\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"\[data\]\.task: only for source = 'synthetic'"):
        load_config(CONFIGS / "tiny-test.toml", ['data.source="gsm8k"', 'data.partition="iid"', 'data.task="choice"'])


def test_paths_sampled_from_a_model_are_verified_by_their_choice_lines(tmp_path):
    # the paths a memorising d32 model samples, verified like any run's (tests/helpers.py)
    for c, ex in sampled_task_paths("choice", tmp_path):
        assert c.verified == verify_path(c.text, ex) and c.steps == check_steps(c.text).n_steps
        if c.verified:
            assert check_steps(c.text, ex.options).choice == ex.answer and c.steps == ex.num_steps
            # the same path against other options: its choice line no longer holds
            moved = dataclasses.replace(ex, options=ex.options[1:] + ex.options[:1])
            assert not check_steps(c.text, moved.options).all_ok


def test_final_step_separates_the_chain_from_the_letter():
    from lada.data.answers import final_step

    lines = EX.rationale.splitlines()
    wrong = _wrong_letter()
    right = example_target(EX)
    chain_then_wrong_letter = "\n".join([*lines[:-1], f"{_value(EX.options[LETTERS.index(wrong)])} ({wrong})",
                                         f"#### {wrong}"])
    gold = _value(EX.options[LETTERS.index(EX.answer)])
    wrong_chain = f"{gold}+1=<<{gold}+1={gold + 1}>>{gold + 1}\n#### {EX.answer}"  # right letter, wrong value
    outputs = [right, chain_then_wrong_letter, "no chain at all\n#### " + EX.answer, wrong_chain]
    assert final_step(outputs, [EX] * 4) == (4, 2, 1)
    # number questions are left out
    arith = generate("shop", 1, seed=0)[0]
    assert final_step([right], [arith]) == (0, 0, 0)


def test_the_warmup_table_shows_the_option_lookup_on_the_choice_task():
    from lada.models.warmup import format_table

    cfg = load_config(CONFIGS / "task2.toml")
    row = {"who": "server", "model": cfg.server, "params": 1e6, "steps": 10, "seconds": 1.0, "domain": "",
           "accuracy": {"general 1-3": 0.5, "chain right": 0.9, "answer if chain right": 0.25}}
    table = format_table(cfg, [row])
    assert table.splitlines()[0].endswith("| chain right | answer if chain right |")
    assert table.splitlines()[2].endswith("| 90% | 25% |")
    assert "chain right" not in format_table(load_config(CONFIGS / "default.toml"), [row])
