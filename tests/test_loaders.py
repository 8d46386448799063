"""Loaders on the shipped files, and located errors on malformed input."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from lada.data.answers import verify_path
from lada.data.loaders import (
    DataFormatError,
    LoadReport,
    default_path,
    load_aqua,
    load_dataset,
    load_gsm8k,
    load_jsonl,
    load_strategyqa,
)
from lada.data.records import example_target


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k()


@pytest.fixture(scope="module")
def strategyqa():
    return load_strategyqa()


@pytest.fixture(scope="module")
def aqua():
    return load_aqua()


# ----------------------------------------------------------------------------- shipped data


def test_default_paths_exist():
    for source in ("gsm8k", "strategyqa", "aqua"):
        assert default_path(source).is_dir()
    assert default_path("gsm8k", "train").name == "train.jsonl.gz"
    assert default_path("aqua", "test").name == "test.json"
    with pytest.raises(ValueError, match="unknown split"):
        default_path("gsm8k", "validation")
    for d in ("gsm8k", "strategyqa", "aqua_rat"):
        folder = default_path("gsm8k").parent / d
        assert (folder / "SOURCE.md").is_file() and (folder / "LICENSE").is_file()


def test_gsm8k_real(gsm8k):
    assert len(gsm8k) == 7473 + 1319
    first = gsm8k[0]
    assert first.id == "gsm8k-train-00000"
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.rationale.splitlines() == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.",
    ]
    assert (first.answer, first.answer_type, first.domain, first.source) == ("72", "number", "general", "gsm8k")
    assert gsm8k[7473].id == "gsm8k-test-00000"
    assert len({ex.id for ex in gsm8k}) == len(gsm8k)
    answers = [ex.answer for ex in gsm8k]
    assert not any("," in a or "#" in a for a in answers)
    assert sum(a.startswith("-") for a in answers) == 5  # 3 train + 2 test negatives
    assert all(ex.rationale and "####" not in ex.rationale for ex in gsm8k)
    # Every gold rationale passes the step checker (all calculator notes are right).
    assert all(verify_path(example_target(ex), ex) for ex in gsm8k[:2000])


def test_gsm8k_split_file(tmp_path):
    xs = load_gsm8k(default_path("gsm8k", "test"))
    assert len(xs) == 1319 and xs[0].id == "gsm8k-test-00000"
    assert xs[0].question.startswith("Janet")
    assert xs[0].answer == "18"


def test_strategyqa_real(strategyqa):
    assert len(strategyqa) == 2061 + 229
    first = strategyqa[0]
    assert first.id == "strategyqa-train-00000"
    assert first.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert first.answer == "yes" and first.answer_type == "yesno" and first.domain == "general"
    assert first.rationale.splitlines()[:2] == ["Julius Caesar had three children.", "Genghis Khan had sixteen children."]
    assert sum(ex.answer == "yes" for ex in strategyqa) == 964 + 107


def test_aqua_real(aqua):
    assert len(aqua) == 254 + 254
    first = aqua[0]
    assert first.id == "aqua-dev-00000" and first.answer_type == "option"
    assert len(first.options) == 5 and first.options[0].startswith("A)")
    assert all(ex.answer in "ABCDE" for ex in aqua)
    test0 = next(ex for ex in aqua if ex.id == "aqua-test-00000")
    assert test0.answer == "A" and test0.question.startswith("A car is being driven")
    # "Answer : A" restates the answer and is dropped; the target's answer line says it.
    assert test0.rationale.splitlines()[-1].startswith("So, it takes 5(1 + \u221a3) minutes")
    assert example_target(test0).endswith("#### A")


def test_load_dataset_dispatch():
    assert len(load_dataset("aqua")) == 508
    with pytest.raises(ValueError, match="lada.data.synthetic"):
        load_dataset("synthetic")
    with pytest.raises(ValueError, match="unknown data source"):
        load_dataset("mnist")


# ----------------------------------------------------------------------------- malformed input


def _write(tmp_path: Path, name: str, lines: list) -> Path:
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


GOOD_GSM = {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}


@pytest.mark.parametrize("bad, field", [
    ('{"question": "x", "answer": ', "<json>"),
    ({"answer": "#### 3"}, "question"),
    ({"question": "  ", "answer": "#### 3"}, "question"),
    ({"question": 5, "answer": "#### 3"}, "question"),
    ({"question": "x", "answer": "3"}, "answer"),
    ({"question": "x", "answer": "#### three"}, "answer"),
    ([1, 2], "<record>"),
])
def test_gsm8k_bad_line_is_located(tmp_path, bad, field):
    p = _write(tmp_path, "mine.jsonl", [GOOD_GSM, "", GOOD_GSM, bad, GOOD_GSM])
    with pytest.raises(DataFormatError) as e:
        load_gsm8k(p)
    msg = str(e.value)
    assert str(p) in msg and "line 4:" in msg and f"'{field}'" in msg


def test_skip_bad_reports_every_skip(tmp_path, caplog):
    p = _write(tmp_path, "mine.jsonl", [GOOD_GSM, "not json", {"question": "q"}, GOOD_GSM])
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="lada.data.loaders"):
        xs = load_gsm8k(p, skip_bad=True, report=report)
    assert [ex.id for ex in xs] == ["gsm8k-mine-00000", "gsm8k-mine-00003"]  # ids do not shift
    assert [loc for _, loc, _ in report.skipped] == ["line 2", "line 3"]
    assert "invalid JSON" in report.skipped[0][2] and "'answer'" in report.skipped[1][2]
    assert report.loaded == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("skipping bad record" in w for w in warnings) == 2
    assert any("skipped 2 bad record(s)" in w for w in warnings)


def test_gzip_and_missing_files(tmp_path):
    p = tmp_path / "train.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps(GOOD_GSM) + "\n")
    assert load_gsm8k(p)[0].id == "gsm8k-train-00000"
    with pytest.raises(DataFormatError, match="not found"):
        load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="no gsm8k split files"):
        load_gsm8k(tmp_path / "..")


def test_strategyqa_array_errors_name_record_and_line(tmp_path):
    good = {"qid": "a", "question": "Is water wet?", "answer": True, "facts": ["Water is a liquid."]}
    p = tmp_path / "train.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r) for r in [good, good, {**good, "answer": "yes"}]) + "\n]\n")
    with pytest.raises(DataFormatError) as e:
        load_strategyqa(p)
    assert "record 2 (line 4)" in str(e.value) and "'answer'" in str(e.value) and "expected bool" in str(e.value)
    p.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps({**good, "facts": ["ok", 3]}) + "\n]")
    with pytest.raises(DataFormatError, match=r"record 1 \(line 3\).*'facts\[1\]'"):
        load_strategyqa(p)
    p.write_text("[\n" + json.dumps(good) + ",\n{\"question\": \n]")  # broken JSON stops even skip_bad
    with pytest.raises(DataFormatError, match="invalid JSON"):
        load_strategyqa(p, skip_bad=True)
    report = LoadReport()
    p.write_text("[" + json.dumps(good) + ", " + json.dumps({**good, "facts": None}) + "]")
    assert len(load_strategyqa(p, skip_bad=True, report=report)) == 1 and report.skipped[0][1] == "record 1 (line 1)"


def test_aqua_bad_correct_letter(tmp_path):
    rec = {"question": "q", "options": ["A)1", "B)2"], "rationale": "r", "correct": "C"}
    p = _write(tmp_path, "dev.json", [rec])
    with pytest.raises(DataFormatError, match=r"line 1: field 'correct'"):
        load_aqua(p)


# ----------------------------------------------------------------------------- generic JSONL


def test_jsonl_schema(tmp_path):
    p = _write(tmp_path, "mine.jsonl", [
        {"id": "q1", "question": "How many legs?", "rationale": "2*2=<<2*2=4>>4", "answer": "4",
         "answer_type": "number", "domain": "farm"},
        {"question": "Sky blue?", "rationale": "", "answer": True, "answer_type": "yesno"},
        {"question": "Pick", "rationale": "it is B", "answer": "(b)", "answer_type": "option", "options": ["x", "y"]},
        {"question": "Cost?", "rationale": "", "answer": "1,500", "answer_type": "number"},
    ])
    a, b, c, d = load_jsonl(p)
    assert (a.id, a.domain, a.answer, a.source) == ("q1", "farm", "4", "jsonl")
    assert (b.id, b.answer, b.domain) == ("jsonl-mine-00001", "yes", "general")
    assert c.answer == "B" and c.options == ("A) x", "B) y")
    assert d.answer == "1500"
    assert load_dataset("jsonl", p) == [a, b, c, d]


@pytest.mark.parametrize("bad, field", [
    ({"rationale": "", "answer": "1", "answer_type": "number"}, "question"),
    ({"question": "q", "answer": "1", "answer_type": "number"}, "rationale"),
    ({"question": "q", "rationale": "", "answer_type": "number"}, "answer"),
    ({"question": "q", "rationale": "", "answer": "1", "answer_type": "float"}, "answer_type"),
    ({"question": "q", "rationale": "", "answer": "one", "answer_type": "number"}, "answer"),
    ({"question": "q", "rationale": "", "answer": True, "answer_type": "number"}, "answer"),
    ({"question": "q", "rationale": "", "answer": "C", "answer_type": "option"}, "options"),
    ({"question": "q", "rationale": "", "answer": "C", "answer_type": "option", "options": ["a", "b"]}, "answer"),
    ({"question": "q", "rationale": "", "answer": "1", "answer_type": "number", "domian": "x"}, "domian"),
    ({"question": "q", "rationale": 3, "answer": "1", "answer_type": "number"}, "rationale"),
    ({"id": "dup", "question": "q", "rationale": "", "answer": "1", "answer_type": "number"}, "id"),
])
def test_jsonl_bad_fields(tmp_path, bad, field):
    first = {"id": "dup", "question": "q", "rationale": "", "answer": "1", "answer_type": "number"}
    p = _write(tmp_path, "mine.jsonl", [first, bad])
    with pytest.raises(DataFormatError) as e:
        load_jsonl(p)
    assert f"{p}: line 2: field '{field}'" in str(e.value)


def test_jsonl_needs_a_path():
    with pytest.raises(DataFormatError, match="needs a path"):
        load_dataset("jsonl")


def test_docs_jsonl_example_loads(tmp_path):
    """The schema example in docs/data.md stays valid."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    p = tmp_path / "example.jsonl"
    p.write_text(block)
    xs = load_jsonl(p)
    assert len(xs) == 3 and all(verify_path(example_target(ex), ex) for ex in xs)
