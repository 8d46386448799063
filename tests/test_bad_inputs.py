"""Every bad input is one clear error naming the file, line or field (never a traceback,
never silently accepted): a table of bad data files, bad command lines and bad configs,
each run through the real command line (`lada.cli.main`)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lada.cli import main
from lada.data.loaders import LoadReport, load_jsonl

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny-test.toml")


def _rec(**kw):
    base = {"question": "Ann has 2 apples and finds 3. How many?", "rationale": "2+3=<<2+3=5>>5",
            "answer": "5", "answer_type": "number"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def _opt(**kw):
    return _rec(question="Where do you buy shoes?", rationale="Shoes are sold in shops.", answer="C",
                answer_type="option", options=["A) park", "B) school", "C) mall"], **kw)


def _lines(*recs) -> bytes:
    recs = [{k: v for k, v in r.items() if v is not ...} for r in recs]
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


GOOD = _rec()

# (case id, file bytes, file name, what the one-line error must contain)
DATA_CASES = [
    ("empty file", b"", "d.jsonl", "no records"),
    ("only blank lines", b"\n\n  \n", "d.jsonl", "no records"),
    ("invalid json line", _lines(GOOD) + b"{oops\n", "d.jsonl", "line 2: field '<json>': invalid JSON"),
    ("truncated json", _lines(GOOD)[:-9], "d.jsonl", "line 1: field '<json>'"),
    ("array record", _lines(GOOD) + b"[1, 2]\n", "d.jsonl", "line 2: field '<record>': expected a JSON object"),
    ("string record", b'"hello"\n', "d.jsonl", "line 1: field '<record>'"),
    ("missing question", _lines(_rec(question=...)), "d.jsonl", "field 'question': missing"),
    ("question not a string", _lines(_rec(question=5)), "d.jsonl", "field 'question': expected str"),
    ("empty question", _lines(_rec(question="  ")), "d.jsonl", "field 'question': empty"),
    ("missing rationale", _lines(_rec(rationale=...)), "d.jsonl", "field 'rationale': missing"),
    ("rationale a list", _lines(_rec(rationale=["a"])), "d.jsonl", "field 'rationale': expected str"),
    ("unknown answer_type", _lines(_rec(answer_type="float")), "d.jsonl", "field 'answer_type'"),
    ("answer not a number", _lines(_rec(answer="five")), "d.jsonl", "field 'answer'"),
    ("answer bool for number", _lines(_rec(answer=True)), "d.jsonl", "field 'answer'"),
    ("answer NaN", b'{"question": "q?", "rationale": "", "answer": NaN, "answer_type": "number"}\n', "d.jsonl",
     "field 'answer'"),
    ("answer Infinity", b'{"question": "q?", "rationale": "", "answer": Infinity, "answer_type": "number"}\n',
     "d.jsonl", "field 'answer'"),
    ("answer a list", _lines(_rec(answer=[5])), "d.jsonl", "field 'answer'"),
    ("yesno answer 'maybe'", _lines(_rec(answer="maybe", answer_type="yesno")), "d.jsonl", "field 'answer'"),
    ("gold letter beyond options", _lines(_opt() | {"answer": "D"}), "d.jsonl", "field 'answer'"),
    ("mislabelled options", _lines(_opt() | {"options": ["C) 5", "D) 6"], "answer": "A"}), "d.jsonl",
     "field 'options[0]': label 'C' is out of order"),
    ("duplicate option labels", _lines(_opt() | {"options": ["A) 5", "A) 6"], "answer": "A"}), "d.jsonl",
     "field 'options[1]': label 'A' repeats"),
    ("labels out of order", _lines(_opt() | {"options": ["A) 5", "C) 6", "B) 7"], "answer": "A"}), "d.jsonl",
     "field 'options[1]'"),
    ("labelled and bare mixed", _lines(_opt() | {"options": ["A) 5", "six"], "answer": "A"}), "d.jsonl",
     "field 'options[1]'"),
    ("options on a number question", _lines(_rec(options=["A) 5", "B) 6"])), "d.jsonl", "field 'options'"),
    ("options on a yesno question", _lines(_rec(answer="yes", answer_type="yesno", options=["A) yes"])), "d.jsonl",
     "field 'options'"),
    ("option question without options", _lines(_opt() | {"options": ...}), "d.jsonl", "field 'options'"),
    ("empty options", _lines(_opt() | {"options": []}), "d.jsonl", "field 'options': empty"),
    ("empty option text", _lines(_opt() | {"options": ["A) park", ""]}), "d.jsonl", "field 'options[1]'"),
    ("option not a string", _lines(_opt() | {"options": ["A) park", 3]}), "d.jsonl", "field 'options[1]'"),
    ("27 options", _lines(_opt() | {"options": [f"o{i}" for i in range(27)]}), "d.jsonl", "field 'options'"),
    ("option answer text of no option", _lines(_opt() | {"answer": "cinema"}), "d.jsonl", "field 'answer'"),
    ("rationale answer line disagrees", _lines(_rec(rationale="2+3=<<2+3=5>>5\n#### 6")), "d.jsonl",
     "field 'rationale'"),
    ("duplicate id", _lines(_rec(id="x"), _rec(id="x")), "d.jsonl", "line 2: field 'id': duplicate id"),
    ("id a list", _lines(_rec(id=[1])), "d.jsonl", "field 'id'"),
    ("id empty", _lines(_rec(id=" ")), "d.jsonl", "field 'id'"),
    ("domain empty", _lines(_rec(domain="")), "d.jsonl", "field 'domain'"),
    ("domain a number", _lines(_rec(domain=3)), "d.jsonl", "field 'domain'"),
    ("unknown field", _lines(_rec(explanation="x")), "d.jsonl", "field 'explanation': unknown field"),
    ("deeply nested json", b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "d.jsonl",
     "nested too deeply"),
    ("5000-digit integer", b'{"question": "q?", "rationale": "", "answer": ' + b"9" * 5000
     + b', "answer_type": "number"}\n', "d.jsonl", "line 1: field '<json>'"),
    ("lone surrogate", b'{"question": "q\\ud800?", "rationale": "", "answer": "1", "answer_type": "number"}\n',
     "d.jsonl", "field 'question': invalid unicode"),
    ("not utf-8", _lines(GOOD) + b'{"question": "\xff\xfe"}\n', "d.jsonl", "line 2: not UTF-8"),
    ("corrupt gzip", gzip.compress(_lines(GOOD))[:20], "d.jsonl.gz", "cannot read"),
    ("not gzip at all", b"plain text", "d.jsonl.gz", "cannot read"),
    ("json array with a bad record", b"[\n" + json.dumps(GOOD).encode() + b",\n 7\n]", "d.json",
     "record 1 (line 3): field '<record>'"),
    ("json array cut short", b"[\n" + json.dumps(GOOD).encode() + b",\n {\"question\": ", "d.json",
     "record 1"),
    ("json array missing comma", b"[\n" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"]",
     "d.json", "expected ',' or ']'"),
    ("empty json array", b"[]", "d.json", "no records"),
]


def _eval_args(tmp_path: Path, data: str) -> list[str]:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    return ["eval", str(ckpt), "--config", TINY, "--participant", "llm", "--data", data]


def _one_clear_line(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2), f"exit code {code}"
    assert err, "no error message"
    last = err[-1]
    assert last.startswith(("error: ", "config error: ")), last
    assert "Traceback" not in "\n".join(err)
    assert needle in last, f"{needle!r} not in {last!r}"
    return last


@pytest.mark.parametrize("case, content, name, needle", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_one_clear_error(tmp_path, capsys, case, content, name, needle):
    path = tmp_path / name
    path.write_bytes(content)
    line = _one_clear_line(capsys, main(_eval_args(tmp_path, f"jsonl:{path}")), needle)
    assert str(path) in line  # the file is named


SHIPPED_FORMAT_CASES = [
    ("gsm8k", "g.jsonl", _lines({"question": "q?", "answer": "no marker"}), "field 'answer': no '####"),
    ("gsm8k", "g.jsonl", _lines({"question": "q?", "answer": "x\n#### many"}), "is not a number"),
    ("gsm8k", "g.jsonl", _lines({"answer": "x\n#### 3"}), "field 'question': missing"),
    ("strategyqa", "s.json", json.dumps([{"question": "q?", "answer": "yes", "facts": []}]).encode(),
     "record 0 (line 1): field 'answer': expected bool"),
    ("strategyqa", "s.json", json.dumps([{"question": "q?", "answer": True, "facts": "f"}]).encode(),
     "field 'facts': expected list"),
    ("strategyqa", "s.json", json.dumps([{"question": "q?", "answer": True, "facts": [1]}]).encode(),
     "field 'facts[0]'"),
    ("aqua", "a.jsonl", _lines({"question": "q?", "options": ["A)1", "B)2"], "rationale": "", "correct": "E"}),
     "field 'correct'"),
    ("aqua", "a.jsonl", _lines({"question": "q?", "options": ["B)1", "C)2"], "rationale": "", "correct": "B"}),
     "field 'options[0]'"),
    ("aqua", "a.jsonl", _lines({"question": "q?", "options": ["1", "2"], "rationale": "", "correct": "A"}),
     "field 'options[0]'"),
]


@pytest.mark.parametrize("source, name, content, needle", SHIPPED_FORMAT_CASES,
                         ids=[f"{c[0]}-{c[3][:20]}" for c in SHIPPED_FORMAT_CASES])
def test_bad_record_of_a_shipped_format(tmp_path, capsys, source, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    _one_clear_line(capsys, main(_eval_args(tmp_path, f"{source}:{path}")), needle)


CLI_CASES = [
    ("participant out of range", ["--participant", "client-9"], "--participant: 'client-9'"),
    ("participant not a name", ["--participant", "foo"], "--participant: 'foo'"),
    ("data source unknown", ["--data", "foo"], "--data: unknown source 'foo'"),
    ("data source synthetic", ["--data", "synthetic"], "--data: unknown source 'synthetic'"),
    ("jsonl without a path", ["--data", "jsonl"], "--data: source 'jsonl' needs a path"),
    ("jsonl path missing", ["--data", "jsonl:/no/such/file.jsonl"], "/no/such/file.jsonl: file not found"),
    ("negative limit", ["--limit", "-5"], "--limit: must be >= 0"),
]


@pytest.mark.parametrize("case, extra, needle", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_eval_command_line(tmp_path, capsys, case, extra, needle):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    args = ["eval", str(ckpt), "--config", TINY, "--participant", "llm"]
    for i in range(0, len(extra), 2):  # later flags replace the defaults above
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    _one_clear_line(capsys, main(args), needle)


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    _one_clear_line(capsys, main(["eval", str(tmp_path / "nope"), "--config", TINY]), "no such model directory")


CONFIG_CASES = [
    ("list index out of range", "clients.5.lora_r=8", "clients has 3 entries, no index 5"),
    ("list indexed by name", "clients.x.lora_r=8", "clients is a list"),
    ("scalar indexed", "name.x=1", "name is a str"),
    ("empty key part", "train..lr=1", "empty key part"),
    ("no equals sign", "train.lr", "must look like key.path=value"),
    ("negative server_train_size", "data.server_train_size=-5", "[data].server_train_size: must be >= 0"),
    ("malformed generated domain", 'data.domains=["shop","gen01"]', "[data].domains[1]: 'gen01'"),
    ("unknown domain", 'data.domains=["shop","farm","moon"]', "[data].domains[2]: 'moon'"),
    ("repeated domain", 'data.domains=["shop","farm","farm"]', "each client needs its own domain"),
    ("lora_dropout 2.0", "clients.0.lora_dropout=2.0", "lora_dropout: must be in [0, 1)"),
    ("max_new_tokens huge", "generation.max_new_tokens=100000", "max_new_tokens: must be < 512"),
    ("max_length huge", "train.max_length=100000", "max_length: must be < 512"),
    ("lr nan", "train.lr=nan", "train.lr: must be a finite number"),
    ("lr inf", "train.lr=inf", "train.lr: must be a finite number"),
    ("lr negative", "train.lr=-1e-3", "lr: must be > 0"),
    ("temperature inf", "generation.temperature=inf", "temperature: must be a finite number"),
    ("temperature negative", "generation.temperature=-1", "temperature: must be >= 0"),
    ("top_p 2", "generation.top_p=2.0", "top_p: must be in (0, 1]"),
    ("reply timeout -1", "engine.reply_timeout_s=-1", "reply_timeout_s: must be > 0"),
    ("cpus per client -2", "engine.cpus_per_client=-2", "cpus_per_client: must be > 0"),
    ("engine kind", 'engine.kind="grpc"', "[engine].kind: must be one of"),
    ("root certificates missing", 'engine.root_certificates="/no/ca.pem"', "root_certificates: '/no/ca.pem'"),
    ("model path missing", 'server.name="/no/such/model-dir"', "[server].name: '/no/such/model-dir'"),
    ("relative model path missing", 'clients.1.name="./models/none"', "#1.name: './models/none'"),
    ("checkpoint missing", 'clients.0.checkpoint="/no/ckpt"', "#0.checkpoint: '/no/ckpt' is not a directory"),
    ("dtype", 'server.dtype="int8"', "[server].dtype: must be one of"),
    ("heads do not divide", "clients.0.hidden_size=30", "not divisible by num_heads"),
    ("zero heads", "clients.0.num_heads=0", "num_heads: must be > 0"),
    ("negative lora rank", "clients.0.lora_r=-1", "lora_r: must be >= 0"),
    ("rounds zero", "rounds=0", "rounds: must be > 0"),
    ("rounds a string", 'rounds="three"', "rounds: expected int"),
    ("rounds a bool", "rounds=true", "rounds: expected int, got bool"),
    ("seed negative", "seed=-1", ".seed: must be in [0,"),
    ("seed huge", "seed=99999999999999", ".seed: must be in [0,"),
    ("data seed negative", "data.seed=-3", "[data].seed: must be in [0,"),
    ("unknown source", 'data.source="csv"', "[data].source: must be one of"),
    ("jsonl without path", 'data.source="jsonl"', "path: required when source = 'jsonl'"),
    ("unknown partition", 'data.partition="random"', "[data].partition: must be one of"),
    ("num_clients zero", "data.num_clients=0", "num_clients: must be > 0"),
    ("clients table count", "data.num_clients=2", "3 [[clients]] tables but data.num_clients = 2"),
    ("dirichlet alpha zero", "data.dirichlet_alpha=0.0", "dirichlet_alpha: must be > 0"),
    ("unknown key", "train.lrr=1", "unknown key(s) ['lrr']"),
    ("unknown table", "trian.lr=1", "unknown key(s) ['trian']"),
    ("unknown host", 'host.name="fedavg"', "unknown host 'fedavg'"),
    ("unknown plugin", 'plugin.name="magic"', "unknown plugin 'magic'"),
    ("unknown host option", "host.check_step=true", "unknown key(s) ['check_step']"),
    ("table replaced by scalar", "train=3", "expected a table"),
    ("clients replaced by scalar", "clients=3", "clients: expected a list"),
    ("warmup lr nan", "server.warmup_lr=nan", "warmup_lr: must be a finite number"),
    ("grad clip zero", "train.grad_clip=0.0", "grad_clip: must be > 0"),
]


@pytest.mark.parametrize("case, override, needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_override_is_one_clear_error(tmp_path, capsys, case, override, needle):
    code = main(["run", TINY, "--engine", "inline", "--run-dir", str(tmp_path / "run"), "--set", override])
    line = _one_clear_line(capsys, code, needle)
    assert code == 2 and "tiny-test.toml" in line


def test_bad_config_files(tmp_path, capsys):
    missing = tmp_path / "none.toml"
    _one_clear_line(capsys, main(["run", str(missing)]), "none.toml: config file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [\n")
    _one_clear_line(capsys, main(["run", str(bad)]), "bad.toml: invalid TOML")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00rounds")
    _one_clear_line(capsys, main(["run", str(binary)]), "bin.toml")


# ----------------------------------------------------------------------------- accepted, but never silently

def _load(tmp_path, *recs):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_lines(*recs))
    report = LoadReport()
    return load_jsonl(path, report=report), report


def test_long_fields_are_cut_and_counted(tmp_path, caplog):
    huge = "word " * 1_000_000  # a 5 MB line
    xs, report = _load(tmp_path, _rec(question="x" * 20_000), _rec(question=huge), GOOD)
    assert len(xs) == 3 and len(report.truncated) == 2
    assert all(len(ex.question) == 4_000 for ex in xs[:2])
    assert "line 1" == report.truncated[0][1] and "20,000 characters" in report.truncated[0][2]
    assert "2 truncated" in str(report)
    assert "truncated 2 over-long field(s)" in caplog.text


def test_wrong_gold_calculator_notes_are_counted(tmp_path, caplog):
    xs, report = _load(tmp_path, _rec(rationale="2+3=<<2+3=6>>6", answer="6"), GOOD,
                       _rec(rationale="2+3=<<2+3=5>>5\nso <<5*2=11>>", answer="11"))
    assert len(xs) == 3
    assert [b[1] for b in report.bad_rationales] == ["line 1", "line 3"]
    assert "first on rationale line 2" in report.bad_rationales[1][2]
    assert "2 with a wrong calculator note" in str(report)
    assert "2 gold rationale(s) with a wrong calculator note" in caplog.text


def test_agreeing_answer_line_in_rationale_is_dropped(tmp_path):
    (ex,), _ = _load(tmp_path, _rec(rationale="2+3=<<2+3=5>>5\n#### 5.0"))
    assert ex.rationale == "2+3=<<2+3=5>>5"


def test_option_labels_and_gold_given_as_text(tmp_path):
    (bare, by_text, labelled), _ = _load(
        tmp_path, _opt() | {"options": ["park", "school", "mall"]}, _opt() | {"answer": "the Mall"},
        _opt() | {"options": ["(A) park", "(B) school"], "answer": "b"})
    assert bare.options == ("A) park", "B) school", "C) mall") and bare.answer == "C"
    assert by_text.answer == "C"
    assert labelled.options == ("(A) park", "(B) school") and labelled.answer == "B"


def test_json_number_answers_in_scientific_notation(tmp_path):
    xs, _ = _load(tmp_path, _rec(answer=1e-07, rationale=""), _rec(answer=1e20, rationale=""),
                  _rec(answer="1 1/2", rationale=""))
    assert [ex.answer for ex in xs] == ["0.0000001", "100000000000000000000", "1.5"]
