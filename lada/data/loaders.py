"""Dataset loaders: every source becomes a list of ``Example``.

Each loader reads JSON Lines or a JSON array (detected from the first character; ``.gz``
files are read transparently). Bad records raise ``DataFormatError`` naming the file,
the 1-based line (JSON Lines) or record index and line (JSON arrays) and the field. With
``skip_bad=True`` bad records are skipped, logged with ``logging.warning`` and listed in
the optional ``LoadReport``: nothing is dropped silently.

A path may be a file or a directory; a directory loads the dataset's known split files
in it, in a fixed order (``SPLITS``). ``default_path(source)`` is the copy shipped in
``<repo root>/data/``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lada.data.answers import canonical_gold, check_steps, option_letter_of_text
from lada.data.records import ANSWER_MARKER, ANSWER_TYPES, LEADING_OPTION_LABEL_RE, TRAILING_OPTION_LABEL_RE, Example

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIRS = {"gsm8k": "gsm8k", "strategyqa": "strategyqa", "aqua": "aqua_rat"}
# Split files per source, in the order a directory is loaded.
SPLITS = {
    "gsm8k": ("train.jsonl", "test.jsonl"),
    "strategyqa": ("train.json", "dev.json"),
    "aqua": ("dev.json", "test.json"),
}
JSONL_FIELDS = ("id", "question", "rationale", "answer", "answer_type", "domain", "options")
JSONL_REQUIRED = ("question", "rationale", "answer", "answer_type")


# Longer texts are cut at load (and counted in the LoadReport, with a warning): no model
# here reads past a few hundred tokens, and a runaway field must not fill the memory of
# every tokenizer and batch downstream.
MAX_QUESTION_CHARS = 4_000
MAX_RATIONALE_CHARS = 8_000
MAX_OPTION_CHARS = 500
MAX_OPTIONS = 26  # option letters A..Z


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, the line or record and the field."""


@dataclass
class LoadReport:
    """What a load skipped (only with ``skip_bad=True``), truncated and flagged, each as
    ``(file, location, reason)`` triples. ``bad_rationales`` are gold rationales that fail
    the calculator check (a wrong ``<<expr=value>>`` note): loaded, but counted."""

    loaded: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    truncated: list[tuple[str, str, str]] = field(default_factory=list)
    bad_rationales: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.loaded} loaded, {len(self.skipped)} skipped, {len(self.truncated)} truncated, "
                f"{len(self.bad_rationales)} with a wrong calculator note in the gold rationale")


class _Bad(Exception):
    """A problem with one record: the field and what is wrong (wrapped into DataFormatError)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"field {field_name!r}: {reason}")


# ----------------------------------------------------------------------------- paths and reading

def default_path(source: str, split: str | None = None) -> Path:
    """The shipped copy of ``source``: its data directory, or one split file of it."""
    if source not in DATA_DIRS:
        raise ValueError(f"no shipped data for source {source!r}; shipped: {sorted(DATA_DIRS)}")
    base = REPO_ROOT / "data" / DATA_DIRS[source]
    if split is None:
        return base
    for name in SPLITS[source]:
        if name.split(".")[0] == split:
            return _existing(base / name)
    raise ValueError(f"{source}: unknown split {split!r}; known: {[n.split('.')[0] for n in SPLITS[source]]}")


def _existing(path: Path) -> Path:
    """``path`` or its gzipped twin (large files are shipped as ``.gz``)."""
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.exists() else path


def _files(path: str | Path, source: str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = [_existing(path / name) for name in SPLITS[source]]
        files = [f for f in files if f.exists()]
        if not files:
            raise DataFormatError(f"{path}: no {source} split files found (looked for {list(SPLITS[source])})")
        return files
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    return [path]


def split_name(path: Path) -> str:
    """``train`` for ``train.jsonl.gz``: the id prefix of the file's records."""
    stem = path.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem) or "data"


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1 if isinstance(e.object, bytes) else "?"
        raise DataFormatError(f"{path}: line {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read: {e}") from None


def _records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(index, location, record_or_error)`` for each record of a JSONL or JSON-array file.

    For JSON Lines, blank lines are skipped and an unparsable line yields a ``_Bad``
    (so ``skip_bad`` can pass over it). ``index`` counts records (blank lines excluded)
    so ids do not shift when a bad record is skipped.
    """
    text = _read_text(path)
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line)
        except json.JSONDecodeError as e:
            rec = _Bad("<json>", f"invalid JSON: {e.msg} at column {e.colno}")
        except RecursionError:
            rec = _Bad("<json>", "invalid JSON: nested too deeply")
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            rec = _Bad("<json>", f"invalid JSON: {str(e).splitlines()[0][:120]}")
        yield index, f"line {lineno}", rec
        index += 1


def _array_records(path: Path, text: str) -> Iterator[tuple[int, str, Any]]:
    """Decode a JSON array element by element, to know each record's line number."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    index, lineno, counted = 0, 1, 0
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        lineno += text.count("\n", counted, pos)  # incremental: no rescans from the start
        counted = pos
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of the array cannot be located reliably: this stops the load even with skip_bad.
            raise DataFormatError(f"{path}: record {index} (line {e.lineno}): invalid JSON: {e.msg} at column {e.colno}") from None
        except RecursionError:
            raise DataFormatError(f"{path}: record {index} (line {lineno}): invalid JSON: nested too deeply") from None
        except ValueError as e:
            raise DataFormatError(f"{path}: record {index} (line {lineno}): invalid JSON: "
                                  f"{str(e).splitlines()[0][:120]}") from None
        yield index, f"record {index} (line {lineno})", rec
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            raise DataFormatError(f"{path}: line {lineno}: invalid JSON: expected ',' or ']' after record {index - 1}")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _load(path: str | Path, source: str, parse: Callable[[dict, str], Example], skip_bad: bool,
          report: LoadReport | None) -> list[Example]:
    """Shared loop: read records, parse each, raise or skip-and-report on bad ones."""
    out: list[Example] = []
    seen: dict[str, str] = {}
    skipped = 0
    report = report if report is not None else LoadReport()
    n_trunc, n_bad_rat = len(report.truncated), len(report.bad_rationales)
    for file in _files(path, source):
        split = split_name(file)
        n_records = 0
        for index, where, rec in _records(file):
            n_records += 1
            try:
                if isinstance(rec, _Bad):
                    raise rec
                if not isinstance(rec, dict):
                    raise _Bad("<record>", f"expected a JSON object, got {type(rec).__name__}")
                ex = parse(rec, f"{source}-{split}-{index:05d}")
                if ex.id in seen:
                    raise _Bad("id", f"duplicate id {ex.id!r} (first at {seen[ex.id]})")
                ex = _truncate(ex, str(file), where, report)
                steps = check_steps(ex.rationale)
                if not steps.all_ok:
                    report.bad_rationales.append(
                        (str(file), where, f"field 'rationale': {steps.n_wrong} wrong calculator note(s), "
                                           f"first on rationale line {steps.first_wrong_line}"))
            except _Bad as e:
                msg = f"{file}: {where}: {e}"
                if not skip_bad:
                    raise DataFormatError(msg) from None
                log.warning("skipping bad record: %s", msg)
                skipped += 1
                report.skipped.append((str(file), where, str(e)))
                continue
            seen[ex.id] = f"{file}: {where}"
            out.append(ex)
        if n_records == 0:
            raise DataFormatError(f"{file}: no records (empty file)")
    report.loaded += len(out)
    if skipped:
        log.warning("%s: skipped %d bad record(s), loaded %d", path, skipped, len(out))
    if not out:
        raise DataFormatError(f"{path}: no usable records ({skipped} bad record(s) skipped)")
    if len(report.truncated) > n_trunc:
        first = report.truncated[n_trunc]
        log.warning("%s: truncated %d over-long field(s), e.g. %s: %s", path, len(report.truncated) - n_trunc,
                    first[1], first[2])
    if len(report.bad_rationales) > n_bad_rat:
        first = report.bad_rationales[n_bad_rat]
        log.warning("%s: %d gold rationale(s) with a wrong calculator note (loaded anyway), e.g. %s: %s", path,
                    len(report.bad_rationales) - n_bad_rat, first[1], first[2])
    return out


def _truncate(ex: Example, file: str, where: str, report: LoadReport) -> Example:
    """Cut over-long fields (counted in ``report``): the question and rationale at their
    limits, each option at MAX_OPTION_CHARS."""
    changes = {}
    for name, limit in (("question", MAX_QUESTION_CHARS), ("rationale", MAX_RATIONALE_CHARS)):
        text = getattr(ex, name)
        if len(text) > limit:
            changes[name] = text[:limit]
            report.truncated.append((file, where, f"field {name!r}: {len(text):,} characters cut to {limit:,}"))
    if any(len(o) > MAX_OPTION_CHARS for o in ex.options):
        changes["options"] = tuple(o[:MAX_OPTION_CHARS] for o in ex.options)
        report.truncated.append((file, where, f"field 'options': option(s) cut to {MAX_OPTION_CHARS} characters"))
    return dataclasses.replace(ex, **changes) if changes else ex


# ----------------------------------------------------------------------------- field helpers

def _get(rec: dict, name: str, types: type | tuple[type, ...]) -> Any:
    if name not in rec:
        raise _Bad(name, "missing")
    value = rec[name]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        want = " or ".join(t.__name__ for t in _as_tuple(types))
        raise _Bad(name, f"expected {want}, got {type(value).__name__}")
    if isinstance(value, str):
        _check_text(value, name)
    return value


def _check_text(value: str, name: str) -> None:
    """JSON allows lone surrogates (``"\\ud800"``), which no UTF-8 file or tokenizer can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(name, f"invalid unicode (a lone surrogate at character {e.start})") from None


def _label(opt: str) -> tuple[str, str] | None:
    """(letter, text) of a labelled option, ``A) text``, ``(A) text`` or ``text (A)``; None if bare."""
    m = LEADING_OPTION_LABEL_RE.match(opt)
    if m:
        return m.group(1), opt[m.end():].strip()
    m = TRAILING_OPTION_LABEL_RE.search(opt)
    return (m.group(1), opt[:m.start()].strip()) if m else None


def _options(rec: dict, answer_type: str, label_bare: bool) -> tuple[str, ...]:
    """The ``options`` list, checked: non-empty strings, labels ``A) B) C) ...`` (or ``... (A)``)
    unique and in order (bare texts are labelled when ``label_bare``; labelled and bare may
    not mix)."""
    opts = _get(rec, "options", list)
    if answer_type != "option":
        raise _Bad("options", f"given, but answer_type is {answer_type!r}; options belong to 'option' questions")
    if not opts:
        raise _Bad("options", "empty list")
    if len(opts) > MAX_OPTIONS:
        raise _Bad("options", f"{len(opts)} options; at most {MAX_OPTIONS} (letters A-Z)")
    out = []
    labelled = None
    for i, opt in enumerate(opts):
        if not isinstance(opt, str) or not opt.strip():
            raise _Bad(f"options[{i}]", "expected a non-empty string")
        _check_text(opt, f"options[{i}]")
        m = _label(opt)
        if labelled is None:
            labelled = bool(m) or not label_bare
        want = chr(65 + i)
        if labelled:
            if not m:
                raise _Bad(f"options[{i}]", f"{opt.strip()[:40]!r} has no label; expected '{want}) ...' "
                                            "(label every option, or none)")
            letter, body = m
            if letter.upper() != want:
                what = "repeats" if ord(letter.upper()) < ord(want) else "is out of order"
                raise _Bad(f"options[{i}]", f"label {letter!r} {what}; expected {want!r} "
                                            "(labels run A, B, C, ... in order)")
            if not body:
                raise _Bad(f"options[{i}]", f"label {want!r} has no text")
            out.append(opt.strip())
        else:
            if m:
                raise _Bad(f"options[{i}]", f"{opt.strip()[:40]!r} is labelled but earlier options are not "
                                            "(label every option, or none)")
            out.append(f"{want}) {opt.strip()}")
    return tuple(out)


def _check_gold_option(answer: str, options: tuple[str, ...], field_name: str, raw: Any) -> None:
    if ord(answer) - ord("A") >= len(options):
        letters = ", ".join(chr(65 + i) for i in range(len(options)))
        raise _Bad(field_name, f"{raw!r} is not one of the option labels ({letters})")


def _rationale_without_answer_line(rationale: str, answer: str, answer_type: str) -> str:
    """A rationale may end with its own ``#### X`` line: it must agree with ``answer`` (it
    is then dropped: the target adds the answer line itself)."""
    if ANSWER_MARKER not in rationale:
        return rationale
    body, stated = rationale.rsplit(ANSWER_MARKER, 1)
    stated = stated.strip().splitlines()[0].strip() if stated.strip() else ""
    if answer_type == "number":
        from lada.data.answers import numbers_equal

        said = canonical_gold(stated, "number")
        agrees = said is not None and numbers_equal(said, answer)
    else:
        agrees = canonical_gold(stated, answer_type) == answer
    if not agrees:
        raise _Bad("rationale", f"its '{ANSWER_MARKER} {stated[:40]}' line disagrees with answer {answer!r}")
    return body.strip()


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _question(rec: dict) -> str:
    q = _get(rec, "question", str).strip()
    if not q:
        raise _Bad("question", "empty")
    return q


# ----------------------------------------------------------------------------- sources

def _parse_gsm8k(rec: dict, default_id: str) -> Example:
    question = _question(rec)
    solution = _get(rec, "answer", str)
    if ANSWER_MARKER not in solution:
        raise _Bad("answer", f"no '{ANSWER_MARKER} <number>' answer line")
    rationale, final = solution.rsplit(ANSWER_MARKER, 1)
    answer = canonical_gold(final, "number")
    if answer is None:
        raise _Bad("answer", f"final answer {final.strip()!r} is not a number")
    return Example(default_id, question, rationale.strip(), answer, "number", "general", "gsm8k")


def load_gsm8k(path: str | Path = "", skip_bad: bool = False, report: LoadReport | None = None) -> list[Example]:
    """GSM8K JSONL ``{"question", "answer"}``; ``answer`` holds the steps and a ``#### N`` line."""
    return _load(path or default_path("gsm8k"), "gsm8k", _parse_gsm8k, skip_bad, report)


def _parse_strategyqa(rec: dict, default_id: str) -> Example:
    question = _question(rec)
    answer = _get(rec, "answer", bool)
    facts = _get(rec, "facts", list)
    for i, fact in enumerate(facts):
        if not isinstance(fact, str):
            raise _Bad(f"facts[{i}]", f"expected str, got {type(fact).__name__}")
    rationale = "\n".join(" ".join(f.split()) for f in facts if f.strip())
    return Example(default_id, question, rationale, "yes" if answer else "no", "yesno", "general", "strategyqa")


def load_strategyqa(path: str | Path = "", skip_bad: bool = False, report: LoadReport | None = None) -> list[Example]:
    """StrategyQA JSON array ``{"question", "answer": bool, "facts": [str]}``; facts become the steps."""
    return _load(path or default_path("strategyqa"), "strategyqa", _parse_strategyqa, skip_bad, report)


# The last rationale line often only restates the answer ("Answer : A", "The answer is B.",
# "CORRECT OPTION: E", "D"): it is dropped, because the target's answer line says it again.
# A statement at the end of a longer line ("... = 250 m. Answer D") is cut off that line.
_AQUA_ANSWER_LINE = re.compile(
    r"^\W*(?:(?i:(?:the\s+)?(?:correct\s+)?(?:answer|ans|option|choice)(?:\s+(?:is|will be|should be))?)"
    r"[\s:.=\-]*(?i:option|choice)?[\s:.=\-]*)?\(?([A-E])\)?\W*$"
)
_AQUA_ANSWER_SUFFIX = re.compile(r"(?i:\b(?:answer|ans)(?:\s+is)?)[\s:.=\-]*(?i:option)?[\s:.=\-]*\(?([A-E])\)?\W*$")


def _strip_answer_statement(lines: list[str], answer: str) -> list[str]:
    if not lines:
        return lines
    if (m := _AQUA_ANSWER_LINE.match(lines[-1])) and m.group(1) == answer:
        return lines[:-1]
    if (m := _AQUA_ANSWER_SUFFIX.search(lines[-1])) and m.group(1) == answer:
        head = lines[-1][: m.start()].rstrip()
        return lines[:-1] + [head] if head else lines[:-1]
    return lines


def _parse_aqua(rec: dict, default_id: str) -> Example:
    question = _question(rec)
    options = _options(rec, "option", label_bare=False)
    correct = _get(rec, "correct", str)
    answer = canonical_gold(correct, "option")
    if answer is None:
        raise _Bad("correct", f"{correct!r} is not an option letter")
    _check_gold_option(answer, options, "correct", correct)
    lines = [line.strip() for line in _get(rec, "rationale", str).splitlines() if line.strip()]
    lines = _strip_answer_statement(lines, answer)
    return Example(default_id, question, "\n".join(lines), answer, "option", "general", "aqua", options)


def load_aqua(path: str | Path = "", skip_bad: bool = False, report: LoadReport | None = None) -> list[Example]:
    """AQuA-RAT JSONL ``{"question", "options": ["A)..",..], "rationale", "correct": "A"}``."""
    return _load(path or default_path("aqua"), "aqua", _parse_aqua, skip_bad, report)


def _parse_jsonl(rec: dict, default_id: str) -> Example:
    unknown = sorted(set(rec) - set(JSONL_FIELDS))
    if unknown:
        raise _Bad(unknown[0], f"unknown field(s) {unknown}; known fields: {list(JSONL_FIELDS)}")
    question = _question(rec)
    rationale = _get(rec, "rationale", str).strip()
    answer_type = _get(rec, "answer_type", str)
    if answer_type not in ANSWER_TYPES:
        raise _Bad("answer_type", f"must be one of {list(ANSWER_TYPES)}, got {answer_type!r}")
    raw = _get(rec, "answer", (str, int, float, bool))
    if isinstance(raw, bool) != (answer_type == "yesno") and not isinstance(raw, str):
        raise _Bad("answer", f"a {type(raw).__name__} answer does not fit answer_type {answer_type!r}")
    # Bare option texts are labelled "A) .." so the prompt names the letters.
    options: tuple[str, ...] = _options(rec, answer_type, label_bare=True) if "options" in rec else ()
    answer = canonical_gold(str(raw).lower() if isinstance(raw, bool) else str(raw), answer_type)
    if answer_type == "option":
        if not options:
            raise _Bad("options", "required when answer_type is 'option'")
        if answer is None:  # the answer may be given as an option's text
            answer = option_letter_of_text(str(raw), options)
        if answer is None:
            raise _Bad("answer", f"{raw!r} is neither an option letter nor the text of exactly one option")
        _check_gold_option(answer, options, "answer", raw)
    if answer is None:
        raise _Bad("answer", f"{raw!r} is not a valid {answer_type} answer")
    rationale = _rationale_without_answer_line(rationale, answer, answer_type)
    ex_id = rec.get("id", default_id)
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool) or not str(ex_id).strip():
        raise _Bad("id", "expected a non-empty string or integer")
    domain = rec.get("domain", "general")
    if not isinstance(domain, str) or not domain.strip():
        raise _Bad("domain", "expected a non-empty string")
    return Example(str(ex_id), question, rationale, answer, answer_type, domain.strip(), "jsonl", options)


def load_jsonl(path: str | Path, skip_bad: bool = False, report: LoadReport | None = None) -> list[Example]:
    """The generic schema for your own data (docs/data.md): one JSON object a line with
    ``question``, ``rationale``, ``answer``, ``answer_type`` and optional ``id``, ``domain``,
    ``options``. Unknown fields are an error (a misspelt optional field would otherwise be lost)."""
    if not path:
        raise DataFormatError("source 'jsonl' needs a path to your data file")
    if Path(path).is_dir():
        raise DataFormatError(f"{path}: is a directory; source 'jsonl' needs a file")
    return _load(path, "jsonl", _parse_jsonl, skip_bad, report)


LOADERS: dict[str, Callable[..., list[Example]]] = {
    "gsm8k": load_gsm8k,
    "strategyqa": load_strategyqa,
    "aqua": load_aqua,
    "jsonl": load_jsonl,
}


def load_dataset(source: str, path: str | Path = "", skip_bad: bool = False,
                 report: LoadReport | None = None) -> list[Example]:
    """Load ``source`` (gsm8k | strategyqa | aqua | jsonl) from ``path`` (default: shipped copy)."""
    if source == "synthetic":
        raise ValueError("source 'synthetic' is generated, not loaded from a file: "
                         "use lada.data.synthetic (or lada.data.build_federated_data)")
    if source not in LOADERS:
        raise ValueError(f"unknown data source {source!r}; known: synthetic, {', '.join(LOADERS)}")
    return LOADERS[source](path, skip_bad=skip_bad, report=report)
