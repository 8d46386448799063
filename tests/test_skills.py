"""The answer-step bench (lada.experiments.skills): its items are right by construction
and a run writes its table."""

from __future__ import annotations

import json
import random

import pytest

from lada.data.answers import is_correct
from lada.data.records import example_target
from lada.experiments.skills import LETTERS, NEAR, SKILLS, main, make_item


@pytest.mark.parametrize("skill", SKILLS)
def test_items_are_right_and_balanced(skill):
    rng = random.Random(0)
    items = [make_item(skill, rng, i) for i in range(1000)]
    assert all(is_correct(example_target(ex), ex.answer, ex.answer_type, ex.options) for ex in items)
    answers = [ex.answer for ex in items]
    kinds = sorted(set(answers))
    assert kinds == (["no", "yes"] if skill in ("compare", "parity") else list(LETTERS))
    assert all(0.5 / len(kinds) < answers.count(k) / len(items) < 1.5 / len(kinds) for k in kinds)
    for ex in items[:200]:
        value = int(ex.question.split()[3].rstrip("."))
        if skill == "compare":
            t = int(ex.question.rsplit(" ", 1)[1].rstrip("?"))
            assert 1 <= t and 0 < abs(t - value) <= NEAR and (ex.answer == "yes") == (value > t)
        elif skill.startswith("lookup"):
            values = [int("".join(ch for ch in o if ch.isdigit())) for o in ex.options]
            assert len(set(values)) == 5 and values[LETTERS.index(ex.answer)] == value
            assert all(abs(x - value) <= NEAR for x in values)
            if skill == "lookup-last-digit":
                assert len({x % 10 for x in values}) == 5


def test_a_bench_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "skills.json"
    assert main(["--skills", "compare", "--steps", "2", "--hidden-size", "16", "--num-layers", "1",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["skill"] == "compare" and 0 <= rows[0]["accuracy"] <= 1
    assert rows[0]["chance"] == 0.5 and rows[0]["model"] == "tiny-llama d16x1"
    assert "| compare | tiny-llama d16x1 | 2 |" in out.with_suffix(".md").read_text()
    # a rerun of the same cell replaces its row; unknown skills are refused by name
    main(["--skills", "compare", "--steps", "2", "--hidden-size", "16", "--num-layers", "1", "--out", str(out)])
    assert len(json.loads(out.read_text())) == 1
    with pytest.raises(SystemExit):
        main(["--skills", "lookup,sorting", "--out", str(out)])
    assert "unknown skill(s) ['sorting']" in capsys.readouterr().err
