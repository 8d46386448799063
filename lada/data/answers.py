"""Reading answers out of generated text, and checking them.

Generated text can be anything (a half-trained model writes garbage), so every function
here accepts any string and never raises on it. Rules, in short (details in docs/data.md):

- The answer is read from the text after the *last* ``####`` marker (first non-empty
  line after it). Without a marker we fall back: first an explicit "answer is X" phrase
  (the last one), then the last number (``number``), the last parenthesised/``X)`` letter
  (``option``) or the last yes/no/true/false word (``yesno``).
- Numbers are compared by value: commas, ``$``, ``%``, units and trailing periods are
  ignored, ``3.0 == 3``, ``1/2 == 0.5``.
- Calculator notes ``<<expr=value>>`` are evaluated with a small AST-based arithmetic
  evaluator (no ``eval``); an unparsable note counts as a wrong step.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from lada.data.records import (ANSWER_MARKER, CHOICE_LINE_RE, LEADING_OPTION_LABEL_RE, PARITY_LINE_RE,
                               TRAILING_OPTION_LABEL_RE, Example, asks_parity, is_link_line)

# ----------------------------------------------------------------------------- numbers

# A number token: optional sign (only when not glued to a preceding word or number, so
# "10-3" is two numbers), optional "$", then a fraction, a thousands-grouped number or a
# plain number with optional decimals.
_NUMBER_RE = re.compile(
    r"(?<![\w).])(?P<sign>[-\u2212+]?)\s?\$?\s?"
    r"(?P<num>\d+\s*/\s*\d+(?![\d.,])|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:\.\d+)?|\.\d+)"
)
_REL_TOL = 1e-9  # relative; big integers must still match exactly


def _to_decimal(sign: str, num: str) -> Decimal | None:
    try:
        if "/" in num:
            a, b = (int(x) for x in num.split("/"))
            if b == 0:
                return None
            value = Decimal(a) / Decimal(b)
        else:
            value = Decimal(num.replace(",", ""))
    except (InvalidOperation, ValueError):
        return None
    return -value if sign in ("-", "\u2212") else value


def _canonical(value: Decimal) -> str:
    """``Decimal`` -> shortest plain string: ``3.0`` -> ``3``, ``-0`` -> ``0``, ``2.50`` -> ``2.5``."""
    s = format(value, "f")  # plain digits, exact (no context rounding, no int() size limit)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def find_numbers(text: str) -> list[str]:
    """All number tokens in ``text``, each as a canonical number string."""
    out = []
    for m in _NUMBER_RE.finditer(text):
        value = _to_decimal(m["sign"], m["num"])
        if value is not None:
            out.append(_canonical(value))
    return out


# Forms only read from a stated answer (after ``####``, or a gold answer), never picked out
# of free text, where they would misread "3 5" or "2 1/2 hours later": a mixed number
# ``1 1/2``, thousands grouped by spaces ``1 000`` and scientific notation ``1e3``.
_STATED_NUMBER_RE = re.compile(
    r"\s*(?P<sign>[-\u2212+]?)\s?\$?\s?(?:"
    r"(?P<whole>\d+)\s+(?P<fnum>\d+)\s*/\s*(?P<fden>\d+)"
    r"|(?P<spaced>\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?:\.\d+)?)"
    r"|(?P<sci>(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d{1,3})"
    r")(?![\d.,/]|[eE]\d)"
)


def _stated_number(text: str) -> tuple[str | None, int]:
    """``(canonical, end)`` of a number in one of the stated-answer forms at the start of
    ``text``, or ``(None, 0)``."""
    m = _STATED_NUMBER_RE.match(text)
    if m is None:
        return None, 0
    try:
        if m["whole"] is not None:
            den = int(m["fden"])
            if den == 0:
                return None, 0
            value = Decimal(int(m["whole"])) + Decimal(int(m["fnum"])) / Decimal(den)
        elif m["spaced"] is not None:
            value = Decimal(re.sub(r"\s", "", m["spaced"]))
        else:
            value = Decimal(m["sci"])
    except InvalidOperation:
        return None, 0
    value = -value if m["sign"] in ("-", "\u2212") else value
    return _canonical(value), m.end()


def _answer_number(seg: str) -> str | None:
    """The number an answer line states: a stated-answer form at its start, else the first
    number token in it."""
    value, _ = _stated_number(seg)
    if value is not None:
        return value
    nums = find_numbers(seg)
    return nums[0] if nums else None


def canonical_number(text: str) -> str | None:
    """Canonical form of a string that *is* a number (gold answers): ``"1,234"`` -> ``"1234"``,
    ``"-$5.50"`` -> ``"-5.5"``, ``"3.0"`` -> ``"3"``, ``"1 1/2"`` -> ``"1.5"``, ``"1e3"`` ->
    ``"1000"``, ``"1 000"`` -> ``"1000"``. ``None`` if it is not exactly one number (a trailing
    period, ``%`` or ``$`` is tolerated)."""
    s = text.strip().rstrip(".").strip()
    s = s.removesuffix("%").strip()
    value, end = _stated_number(s)
    if value is not None and end == len(s):
        return value
    m = _NUMBER_RE.fullmatch(s) or _NUMBER_RE.fullmatch(s.replace("$", "", 1))
    if m is None:
        return None
    dec = _to_decimal(m["sign"], m["num"])
    return None if dec is None else _canonical(dec)


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equality of two canonical number strings: exact for whole numbers, with a
    tiny relative tolerance otherwise (a fraction like ``1/3`` is a rounded decimal)."""
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    if x == y:
        return True
    if x == x.to_integral_value() and y == y.to_integral_value():
        return False  # whole numbers match exactly, however large
    return abs(x - y) <= Decimal(str(_REL_TOL)) * max(Decimal(1), abs(y))


# ----------------------------------------------------------------------------- extraction

# Possessive quantifiers (*+, ?+): no backtracking, so long runs of spaces in generated
# text cannot make a search take exponential time.
_ANSWER_PHRASE = r"(?i:\b(?:answer|ans)\b(?:\s*+(?:is|:|=|-))?+(?:\s*+(?:option|choice))?+\s*+[:\-]?+\s*+)"
_OPTION_WORD = r"(?i:\b(?:option|choice)\b\s*+[:\-]?+\s*+)"
_YESNO_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def answer_segment(text: str) -> str | None:
    """The text of the answer line: first non-empty line after the last ``####``."""
    if ANSWER_MARKER not in text:
        return None
    rest = text.rsplit(ANSWER_MARKER, 1)[1].strip()
    return rest.splitlines()[0].strip() if rest else ""


def _option_letters(options: tuple[str, ...] | list[str]) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)] if options else "ABCDEFGHIJ"


def _letter_in_segment(seg: str, letters: str) -> str | None:
    """An option letter in an answer line, in this order: ``(C)``, ``C)``, "option c",
    "answer is C", a lone letter (any case), the first standalone capital letter. A lowercase
    letter counts only where it cannot be an English word ("the answer is a ..." is not A)."""
    both = f"[{letters}{letters.lower()}]"
    patterns = (
        rf"\(\s*({both})\s*\)",
        rf"(?:^|(?<=[\s:]))({both})\)",
        rf"{_OPTION_WORD}\(?({both})\b",
        rf"{_ANSWER_PHRASE}\(?([{letters}])\b",
        rf"^[\s(\[]*({both})[\s)\].:]*$",
        rf"\b([{letters}])\b",
    )
    for p in patterns:
        m = re.search(p, seg)
        if m:
            return m.group(1).upper()
    return None


def option_body(option: str) -> str:
    """An option's text without its label: ``"mall"`` for ``"C) mall"``, ``"(C) mall"``
    or ``"mall (C)"`` (the synthetic choice task lists the value first)."""
    text = LEADING_OPTION_LABEL_RE.sub("", option, count=1)
    return TRAILING_OPTION_LABEL_RE.sub("", text) if text == option else text


def _norm_text(text: str) -> str:
    """Lower case, no punctuation, no leading article, single spaces (to compare option texts)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if len(words) > 1 and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


def _option_by_text(seg: str, options: tuple[str, ...] | list[str]) -> str | None:
    """Map an answer line that states an option's text (``mall`` for ``C) mall``) to its letter."""
    said = _norm_text(seg)
    if not said:
        return None
    hits = [letter for letter, opt in zip(_option_letters(options), options) if _norm_text(option_body(opt)) == said]
    return hits[0] if len(hits) == 1 else None


def option_letter_of_text(text: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The letter of the one option whose text is ``text`` (case, punctuation and a leading
    article ignored), or None."""
    return _option_by_text(text, options)


def _option_by_value(seg: str, options: tuple[str, ...] | list[str]) -> str | None:
    """Map an answer line that states an option's value (``36`` for ``A)36``) to its letter."""
    value = canonical_number(seg)
    if value is None:
        return None
    letters = _option_letters(options)
    for letter, opt in zip(letters, options):
        other = canonical_number(option_body(opt))
        if other is not None and numbers_equal(value, other):
            return letter
    return None


def extract_answer(text: str, answer_type: str, options: tuple[str, ...] | list[str] = ()) -> str | None:
    """The canonical answer stated in generated ``text`` (``"18"``, ``"C"``, ``"yes"``), or None.

    ``options`` (AQuA) restricts option letters to the valid ones and lets an answer line
    that states an option's value map to its letter.
    """
    if not isinstance(text, str) or not text:
        return None
    seg = answer_segment(text)
    if answer_type == "number":
        if seg is not None:
            return _answer_number(seg)
        phrases = re.findall(rf"{_ANSWER_PHRASE}(\S[^\n]*)", text)
        for phrase in reversed(phrases):
            nums = find_numbers(phrase)
            if nums:
                return nums[0]
        nums = find_numbers(text)
        return nums[-1] if nums else None
    if answer_type == "option":
        letters = _option_letters(options)
        if seg is not None:
            if options and not re.fullmatch(r"[\s(\[]*[A-Za-z][\s)\].:]*", seg):
                # an answer line that is exactly one option's text names that option
                # ("#### mall"), even when the text holds a capital letter of its own
                by_text = _option_by_text(seg, options)
                if by_text:
                    return by_text
            return _letter_in_segment(seg, letters) or (_option_by_value(seg, options) if options else None)
        both = f"[{letters}{letters.lower()}]"
        for p in (rf"{_OPTION_WORD}\(?({both})\b|{_ANSWER_PHRASE}\(?([{letters}])\b",
                  rf"\(({both})\)|\b([{letters}])\)"):
            found = re.findall(p, text)
            if found:
                last = found[-1]
                return "".join(last).upper() if isinstance(last, tuple) else last.upper()
        return None
    if answer_type == "yesno":
        if seg is not None:
            m = _YESNO_RE.search(seg)
            if m is None:
                return None
            # "#### not true" is "no" (and "not false" "yes")
            negated = re.search(r"\b(?:not|isn't|is not|never)\s*$", seg[:m.start()], re.IGNORECASE)
            word = _yesno(m.group(1))
            return ("no" if word == "yes" else "yes") if negated else word
        phrases = re.findall(rf"{_ANSWER_PHRASE}((?i:yes|no|true|false))\b", text)
        if phrases:
            return _yesno(phrases[-1])
        words = _YESNO_RE.findall(text)
        return _yesno(words[-1]) if words else None
    return None


def _yesno(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


def canonical_gold(answer: str, answer_type: str) -> str | None:
    """Canonical form of a gold answer given as text (used by the loaders)."""
    a = str(answer).strip()
    if answer_type == "number":
        return canonical_number(a)
    if answer_type == "option":
        m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?\.?", a)
        return m.group(1).upper() if m else None
    if answer_type == "yesno":
        return _yesno(a) if a.lower() in ("yes", "no", "true", "false") else None
    return None


def is_correct(text: str, gold: str, answer_type: str, options: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether the answer stated in ``text`` equals the gold answer."""
    pred = extract_answer(text, answer_type, options)
    if pred is None:
        return False
    gold_c = canonical_gold(gold, answer_type)
    if gold_c is None:
        return False
    if answer_type == "number":
        return numbers_equal(pred, gold_c)
    return pred == gold_c


# ----------------------------------------------------------------------------- calculator notes

_NOTE_RE = re.compile(r"<<([^<>]*)>>")
_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_MAX_EXPR_CHARS = 200
_MAX_EXPONENT = 1000.0


def safe_eval(expr: str) -> float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, unary +/-.

    Works in floats (no huge-integer blow-ups); raises ValueError for anything else
    (names, calls, division by zero, overflow, complex results, overlong input).
    """
    s = expr.strip().replace("\u2212", "-").replace("\u00d7", "*").replace("\u00f7", "/").replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    if not s or len(s) > _MAX_EXPR_CHARS:
        raise ValueError(f"empty or overlong expression {expr!r}")
    try:
        tree = ast.parse(s, mode="eval")
        value = _eval_node(tree.body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"cannot evaluate {expr!r}: {e}") from None
    if not math.isfinite(value):
        raise ValueError(f"non-finite result for {expr!r}")
    return value


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError("exponent too large")
        result = _OPS[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ValueError("complex result")
        return float(result)
    raise ValueError(f"unsupported syntax {type(node).__name__}")


def _decimals(value_text: str) -> int:
    m = re.search(r"\.(\d+)\s*$", value_text.strip())
    return len(m.group(1)) if m else 0


def values_match(computed: float, written: float, written_text: str) -> bool:
    """Whether a note's written result matches the computed one.

    Exact for whole numbers; otherwise equal up to float noise or, when the result is
    written with d decimals, after rounding to d decimals (``10/3=3.33`` is right,
    ``7/2=3`` is not).
    """
    if computed.is_integer() and written.is_integer():
        return computed == written
    if math.isclose(computed, written, rel_tol=_REL_TOL, abs_tol=1e-9):
        return True
    d = _decimals(written_text)
    return d > 0 and abs(computed - written) <= 0.5 * 10.0 ** (-d) + 1e-9


def check_note(note: str) -> bool:
    """Whether one calculator note ``expr=value`` is right; malformed notes are wrong."""
    if note.count("=") != 1:
        return False
    expr, value_text = note.split("=")
    try:
        return values_match(safe_eval(expr), safe_eval(value_text), value_text)
    except ValueError:
        return False


_VISIBLE_RE = re.compile(
    r"\s*\$?\s*(-?(?:\d+\s*/\s*\d+(?![\d.,])|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:\.\d+)?))"
)


def _visible_result_ok(after_note: str, value_text: str) -> bool:
    """GSM8K writes ``<<48/2=24>>24``: a number right after a note must equal the note's value."""
    m = _VISIBLE_RE.match(after_note)
    if m is None:
        return True
    try:
        return values_match(safe_eval(m.group(1)), safe_eval(value_text), value_text)
    except ValueError:
        return False


@dataclass(frozen=True)
class StepCheck:
    """Result of checking every calculator note in a reasoning path.

    ``n_steps``: non-empty lines before the answer line, choice and parity lines not
    counted; ``n_checked``: notes (and checked choice and parity lines) found;
    ``first_wrong_line``: 1-based line number in the text of the first wrong one;
    ``choice``: the letter of the last checked choice line, if any; ``parity``: the answer
    (``"yes"``/``"no"``) the last checked parity line implies, if any; ``last_result``: the
    value of the last right note before the answer line (where the chain ended), if any.
    """

    n_steps: int
    n_checked: int
    n_wrong: int
    all_ok: bool
    first_wrong_line: int | None
    choice: str | None = None
    last_result: str | None = None
    parity: str | None = None


def _choice_ok(value: str, letter: str, options: tuple[str, ...] | list[str], last_result: str | None) -> bool:
    """A choice line ``<value> (<L>)`` is right when option L exists and its text is
    that value, and the value is the result of the last calculator note before it (if any)."""
    idx = _option_letters(options).find(letter)
    if idx < 0:
        return False
    body = canonical_number(option_body(options[idx]))
    if body is None or not numbers_equal(value, body):
        return False
    return last_result is None or numbers_equal(value, last_result)


def _parity_ok(m: re.Match, last_result: str | None) -> bool:
    """A parity line ``<value> is even|odd`` is right when it is true and its value is the
    last calculator note's result (if any)."""
    if (int(m.group(1)) % 2 == 0) != (m.group(2) == "even"):
        return False
    return last_result is None or numbers_equal(m.group(1), last_result)


def check_steps(text: str, options: tuple[str, ...] | list[str] = (), parity: bool = False) -> StepCheck:
    """Check every ``<<expr=value>>`` note before the (last) answer line.

    A note is wrong if its expression does not evaluate to its value, if it cannot be
    parsed, if the number written right after it differs from its value, or if a ``<<``
    is never closed on its line (a truncated note). With the question's ``options``, a
    choice line (``10 (B)``) is checked too: option B must be 10, 10 must be the
    last note's result, and the answer line must name the same option as the last choice
    line (a mismatch counts against that line). With ``parity`` (the question asks whether
    the answer is even: the yes/no task), a parity line (``12 is even``) is checked too: it
    must be true, name the last note's result, and the answer line must say what it implies
    (yes for even). Unchecked choice and parity lines are not steps either.
    """
    if not isinstance(text, str):
        return StepCheck(0, 0, 0, True, None)
    lines = text.splitlines()
    marker_lines = [i for i, line in enumerate(lines) if ANSWER_MARKER in line]
    end = marker_lines[-1] if marker_lines else len(lines)
    n_steps = n_checked = n_wrong = 0
    first_wrong: int | None = None
    last_result: str | None = None  # canonical value of the last well-formed note so far
    choice: tuple[int, str] | None = None  # (line index, letter) of the last choice line
    even: tuple[int, str] | None = None  # (line index, "yes"/"no") of the last parity line
    for i, line in enumerate(lines[:end]):
        if ANSWER_MARKER in line or not line.strip():
            continue
        wrong = 0
        m_choice = CHOICE_LINE_RE.match(line)
        m_parity = PARITY_LINE_RE.match(line)
        if m_choice and options:
            n_checked += 1
            value = canonical_number(m_choice.group(1)) or ""
            wrong += not _choice_ok(value, m_choice.group(2), options, last_result)
            choice = (i, m_choice.group(2))
        elif m_parity and parity:
            n_checked += 1
            wrong += not _parity_ok(m_parity, last_result)
            even = (i, "yes" if m_parity.group(2) == "even" else "no")
        elif not (m_choice or m_parity):
            n_steps += 1
        for m in _NOTE_RE.finditer(line):
            n_checked += 1
            ok = check_note(m.group(1))
            if ok:  # the visible result right after the note must repeat its value
                ok = _visible_result_ok(line[m.end():], m.group(1).split("=")[1])
                last_result = canonical_number(m.group(1).split("=")[1])
            wrong += not ok
        unclosed = _NOTE_RE.sub("", line).count("<<")
        n_checked += unclosed
        wrong += unclosed
        if wrong and first_wrong is None:
            first_wrong = i + 1
        n_wrong += wrong
    # the answer line must say what the last link line (choice or parity) says
    for link, said in ((choice, lambda: extract_answer(text, "option", options)),
                       (even, lambda: extract_answer(text, "yesno"))):
        if link is not None and marker_lines and said() != link[1]:
            n_wrong += 1
            first_wrong = link[0] + 1 if first_wrong is None else min(first_wrong, link[0] + 1)
    return StepCheck(n_steps, n_checked, n_wrong, n_wrong == 0, first_wrong, choice[1] if choice else None,
                     last_result, even[1] if even else None)


def final_step(outputs: list[str], examples: list[Example]) -> tuple[int, int, int]:
    """Where a linked answer goes wrong, for questions whose gold rationale ends on a
    choice or parity line (the synthetic choice and yes/no tasks): ``(n, chain_right,
    answer_right)``, with ``chain_right`` the outputs whose last right note reached the gold
    chain's result, and ``answer_right`` those of them that also give the gold answer. A
    model that reasons well but cannot turn its value into the answer (find it among the
    options, say whether it is even) shows a high first rate and a low second one. Other
    questions are left out of ``n``."""
    n = chain_right = answer_right = 0
    for text, ex in zip(outputs, examples):
        lines = [line for line in ex.rationale.splitlines() if line.strip()]
        gold = check_steps(ex.rationale).last_result if lines and is_link_line(lines[-1]) else None
        if gold is None:
            continue
        n += 1
        reached = check_steps(text, ex.options).last_result
        if reached is not None and numbers_equal(reached, gold):
            chain_right += 1
            answer_right += is_correct(text, ex.answer, ex.answer_type, ex.options)
    return n, chain_right, answer_right


def chain_share(outputs: list[str], examples: list[Example]) -> float | None:
    """On a linked task (yes/no, choice: the answer line follows from the chain's value),
    the share of outputs whose chain reached the gold value (``final_step``); None when no
    question is linked. A yes/no answer is right half the time after a wrong chain, so
    accuracy shows only about half of what the chains gain: this shows the reasoning."""
    n, chain_right, _ = final_step(outputs, examples)
    return chain_right / n if n else None


def verify_path(text: str, example: Example) -> bool:
    """A reasoning path is verified when its answer is right and every calculator step is
    right. When the gold rationale ends on a choice line (the synthetic choice task) or a
    parity line (the yes/no task), the path must state that line too, rightly, so a
    right answer after a wrong chain is not verified."""
    if not is_correct(text, example.answer, example.answer_type, example.options):
        return False
    steps = check_steps(text, example.options, asks_parity(example.question))
    if not steps.all_ok:
        return False
    gold = example.rationale.splitlines()
    if example.options and any(CHOICE_LINE_RE.match(line) for line in gold) and steps.choice is None:
        return False
    return steps.parity is not None or not any(PARITY_LINE_RE.match(line) for line in gold)
