"""Property-based fuzzing of every input a user controls: data files (random truncations,
byte flips, wrong types, deep nesting, huge lines) and ``--set`` overrides. Whatever the
input, the outcome is a load or the project's own error (DataFormatError, ConfigError),
never another exception.

``LADA_FUZZ_EXAMPLES=N`` runs N examples per property instead of the default (and prints a
tally of outcomes at the end: inputs tried, clear errors, loads)."""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lada.config import ConfigError, load_config
from lada.data.loaders import DataFormatError, LoadReport, load_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-test.toml"
N = int(os.environ.get("LADA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=N <= 60,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    if "LADA_FUZZ_EXAMPLES" in os.environ:
        print("\nfuzz tally:", json.dumps(dict(sorted(TALLY.items()))))


def _outcome(kind: str, fn) -> None:
    """Run ``fn``; a load or the project's error is fine, anything else fails the test."""
    TALLY[f"{kind}: tried"] += 1
    try:
        fn()
    except (DataFormatError, ConfigError) as e:
        assert str(e).strip(), "empty error message"
        TALLY[f"{kind}: clear error"] += 1
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        TALLY[f"{kind}: OTHER EXCEPTION"] += 1
        raise AssertionError(f"{kind}: {type(e).__name__} instead of a clear error: {e}") from e
    TALLY[f"{kind}: loaded"] += 1


# ----------------------------------------------------------------------------- data files

GOOD = {
    "jsonl": [
        {"question": "Ann has 2 apples and finds 3. How many?", "rationale": "2+3=<<2+3=5>>5", "answer": "5",
         "answer_type": "number", "id": "a", "domain": "shop"},
        {"question": "Where are shoes sold?", "rationale": "In shops.", "answer": "C", "answer_type": "option",
         "options": ["A) park", "B) school", "C) mall"]},
        {"question": "Is ice cold?", "rationale": "Ice is frozen water.", "answer": True, "answer_type": "yesno"},
    ],
    "gsm8k": [{"question": "2 plus 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
              {"question": "4 times 2?", "answer": "4*2=<<4*2=8>>8\n#### 8"}],
    "aqua": [{"question": "1+1?", "options": ["A)1", "B)2"], "rationale": "1+1=2", "correct": "B"}],
    "strategyqa": [{"question": "Is ice cold?", "answer": True, "facts": ["Ice is frozen water."]}],
}
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def _serialise(source: str, records: list, as_array: bool) -> bytes:
    if as_array or source == "strategyqa":
        return json.dumps(records, indent=1).encode()
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _load(tmp_path: Path, source: str, content: bytes, name: str = "data.jsonl") -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = LoadReport()
    _outcome(source, lambda: load_dataset(source, path, report=report))
    _outcome(f"{source} skip_bad", lambda: load_dataset(source, path, skip_bad=True))


SOURCES = st.sampled_from(sorted(GOOD))


@FUZZ
@given(source=SOURCES, as_array=st.booleans(), cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_files(tmp_path, source, as_array, cut):
    content = _serialise(source, GOOD[source], as_array)
    _load(tmp_path, source, content[: cut % (len(content) + 1)])


@FUZZ
@given(source=SOURCES, as_array=st.booleans(),
       flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1,
                      max_size=8))
def test_byte_flips(tmp_path, source, as_array, flips):
    content = bytearray(_serialise(source, GOOD[source], as_array))
    for pos, byte in flips:
        content[pos % len(content)] = byte
    _load(tmp_path, source, bytes(content))


@FUZZ
@given(source=SOURCES, as_array=st.booleans(), data=st.data())
def test_wrong_types_in_every_field(tmp_path, source, as_array, data):
    records = [dict(r) for r in GOOD[source]]
    rec = records[data.draw(st.integers(0, len(records) - 1))]
    keys = sorted(rec) + ["extra", "options", "id"]
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
        rec[key] = data.draw(JSON_VALUES)
    _load(tmp_path, source, _serialise(source, records, as_array))


@FUZZ
@given(source=SOURCES, depth=st.integers(min_value=1, max_value=200_000), bracket=st.sampled_from("[{"),
       field=st.sampled_from(["question", "answer", "options", "rationale"]))
def test_deep_nesting(tmp_path, source, depth, bracket, field):
    if bracket == "[":
        inner = "[" * depth + "]" * depth
    else:  # {"k": {"k": ... {} ... }}
        inner = '{"k": ' * (depth - 1) + "{}" + "}" * (depth - 1)
    line = '{"' + field + '": ' + inner + ', "answer_type": "number"}'
    content = ("[" + line + "]") if source == "strategyqa" else line + "\n"
    _load(tmp_path, source, content.encode())


@FUZZ
@given(source=SOURCES, size=st.sampled_from([10_000, 300_000, 5_000_000]),
       field=st.sampled_from(["question", "rationale", "answer", "options", "facts", "id", "domain"]),
       char=st.sampled_from(["x", " ", "9", "\u00e9", "#", "<<1+1=2>>"]))
def test_huge_values(tmp_path, source, size, field, char):
    records = [dict(r) for r in GOOD[source]]
    big = char * (size // len(char))
    records[0][field] = [big] if field in ("options", "facts") else big
    _load(tmp_path, source, _serialise(source, records, False))


@FUZZ
@given(source=SOURCES, content=st.binary(max_size=400))
def test_random_bytes(tmp_path, source, content):
    _load(tmp_path, source, content)
    _load(tmp_path, source, content, name="data.jsonl.gz")


# ----------------------------------------------------------------------------- --set overrides

KEYS = ["rounds", "seed", "name", "run_dir", "host", "host.name", "plugin.name", "plugin.filter.kind",
        "plugin.filter.budget_fraction", "data.source", "data.path", "data.num_clients", "data.domains",
        "data.train_per_client", "data.partition", "data.dirichlet_alpha", "data.server_train_size", "server",
        "server.name", "server.hidden_size", "server.num_heads", "server.dtype", "server.checkpoint",
        "clients", "clients.0", "clients.0.lora_r", "clients.2.lora_dropout", "clients.1.name", "clients.9.name",
        "clients.x", "train.lr", "train.batch_size", "train.max_length", "generation.temperature",
        "generation.top_p", "generation.max_new_tokens", "engine.kind", "engine.insecure",
        "engine.root_certificates", "engine.reply_timeout_s", "engine.cpus_per_client", "name.x", "rounds.1"]
VALUES = ["0", "-1", "1", "3", "1e308", "-1e-9", "nan", "inf", "-inf", "true", '""', '"x"', "[]", "[1, 2]",
          '["shop"]', "{}", "{a = 1}", '"/no/such"', "99999999999999999999999", "0.5", "2.0", "[[]]", "'tiny-gpt2'",
          "=", "[" * 50, "1979-05-27", "\x00", "🙂"]


@FUZZ
@given(overrides=st.lists(st.tuples(
    st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_letters + "._0123456789", max_size=20)),
    st.one_of(st.sampled_from(VALUES), st.text(max_size=20))), min_size=1, max_size=4))
def test_set_overrides(overrides):
    _outcome("--set", lambda: load_config(TINY, [f"{k}={v}" for k, v in overrides]))


@FUZZ
@given(raw=st.text(max_size=60))
def test_set_override_raw_strings(raw):
    _outcome("--set raw", lambda: load_config(TINY, [raw]))
