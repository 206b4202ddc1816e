"""``math`` verifier: final-answer equivalence checked with ``math-verify``.

Pipeline for ``score_math(response, reference)``:

1. **Extract the final answer** from the response (:func:`extract_answer`):

   * the content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces,
     escaped ``\\{``/``\\}`` skipped; the brace-less ``\\boxed 5`` form too). For
     nested boxes the innermost-last one wins, i.e. the last box that opens;
   * else the text after the last ``answer is`` / ``Answer:`` phrase (to end of line);
   * else the whole response, if it is one short line that looks like a bare
     answer (no English words), e.g. ``0.5`` or ``\\frac{1}{2}``;
   * else math-verify's own free-text extraction over the tail of the response
     (it prefers "final answer is", then the last LaTeX / plain expression);
   * else the last number in the response.

   Exactly one candidate is chosen (the first rule that applies); alternatives are
   not tried one after another, which would reward listing many answers.

2. **Parse** the answer and the reference (a ``\\boxed{}`` in the reference is
   unwrapped) with ``math_verify.parse``, trying the string as ``$...$`` LaTeX first,
   then boxed, then as a plain expression (plain parsing misreads ``3\\pi`` as ``3``
   and cannot read ``[1,2)`` or ``\\{1,2\\}``).

3. **Compare** with ``math_verify.verify(gold, pred)`` (gold first: it is not
   symmetric). A normalised string match short-cuts to 1.0 without SymPy.

Timeouts: math-verify's built-in timeout uses ``signal.alarm``, which raises off the
main thread (Ray actors, thread pools). We call ``parse(..., parsing_timeout=None)``
and ``verify(..., timeout_seconds=None)`` and rely on process isolation instead:
production scoring goes through :class:`verifiers.pool.ScoringPool`, which kills a
worker whose sample runs past its deadline. Called directly, a pathological input
(e.g. a huge power tower) can run for a long time. math-verify's one-time warning
that its timeout is disabled is filtered out of its loggers, since that is intended.

Never raises: any error (garbage input, SymPy failure, recursion) scores 0.0.
"""

from __future__ import annotations

import logging
import re

from . import register_reference_check, register_verifier

__all__ = ["score_math", "extract_answer", "last_boxed", "answers_equivalent", "math_reference_problem"]

# Only the tail of a long response is searched by the free-text rules: the final
# answer is at the end, and SymPy-backed extraction over megabytes is slow.
_TAIL_CHARS = 4000
# A whole single-line response up to this length may be taken as the bare answer.
_BARE_MAX_CHARS = 200

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_PHRASE = re.compile(r"(?i)\banswer\b\s*(?:is\b\s*:?|:)\s*(?:\*\*)?\s*([^\n]*\S)")
# An English word: 3+ letters not part of a LaTeX command (\frac, \sqrt, ...).
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


class _DropTimeoutDisabledWarning(logging.Filter):
    """Drop math-verify's 'Timeout is disabled' warning (we disable it on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        try:
            return not str(record.msg).startswith("Timeout is disabled")
        except Exception:
            return True


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

from math_verify import parse as _mv_parse  # noqa: E402
from math_verify import verify as _mv_verify  # noqa: E402


def _boxed_spans(text: str) -> list[str]:
    """Contents of every well-formed ``\\boxed``/``\\fbox`` in ``text``, by start position."""
    out: list[str] = []
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        n = len(text)
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            continue
        if text[i] == "{":
            depth = 1
            j = i + 1
            while j < n:
                c = text[j]
                if c == "\\":
                    j += 2  # skip escaped char: \{ \} \\ ...
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0 and j < n:
                out.append(text[i + 1 : j])
        elif i > m.end():
            # "\boxed 5": brace-less form, argument runs to whitespace or '$'.
            k = i
            while k < n and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > i:
                out.append(text[i:k])
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or ``None``."""
    spans = _boxed_spans(text)
    return spans[-1].strip() if spans else None


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    return s


def _clean_answer(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    s = _strip_math_delims(s)
    if s.startswith("**") and s.endswith("**"):
        s = s[2:-2].strip()
    return s.rstrip(".").strip()


def extract_answer(response: str) -> str | None:
    """The final-answer string of ``response`` (see the module docstring), or ``None``."""
    if not isinstance(response, str) or not response.strip():
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    tail = response[-_TAIL_CHARS:]
    phrase = None
    for m in _ANSWER_PHRASE.finditer(tail):
        phrase = m.group(1)
    if phrase is not None:
        ans = _clean_answer(phrase)
        if ans:
            return ans
    stripped = response.strip()
    if (
        "\n" not in stripped
        and len(stripped) <= _BARE_MAX_CHARS
        and not _WORD.search(re.sub(r"\\text\{[^{}]*\}", "", stripped))
    ):
        ans = _clean_answer(stripped)
        if ans:
            return ans
    try:
        found = _mv_parse(tail, parsing_timeout=None)
    except Exception:
        found = []
    strings = [x for x in found if isinstance(x, str) and x.strip()]
    if strings:
        return strings[-1].strip()
    nums = _NUMBER.findall(tail)
    if nums:
        return nums[-1]
    return None


def _parse_answer(s: str) -> list:
    """Parse a bare answer string with math-verify: as LaTeX, then boxed, then plain."""
    s = _strip_math_delims(s)
    if not s:
        return []
    for text in (f"${s}$", f"\\boxed{{{s}}}", s):
        try:
            parsed = _mv_parse(text, parsing_timeout=None)
        except Exception:
            parsed = []
        if parsed:
            return parsed
    return []


_NORM_SUBS = (
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\left|\\right|\\[!,;: ]|\s+"), ""),
)


def _normalise(s: str) -> str:
    s = _strip_math_delims(s)
    for pat, rep in _NORM_SUBS:
        s = pat.sub(rep, s)
    return s.rstrip(".")


def answers_equivalent(pred: str, gold: str) -> bool:
    """Whether answer string ``pred`` is mathematically equivalent to ``gold``."""
    pn, gn = _normalise(pred), _normalise(gold)
    if pn and pn == gn:
        return True
    gold_parsed = _parse_answer(gold)
    if not gold_parsed:
        return False
    pred_parsed = _parse_answer(pred)
    if not pred_parsed:
        return False
    return bool(_mv_verify(gold_parsed, pred_parsed, timeout_seconds=None))


@register_verifier("math")
def score_math(response: str, reference: str) -> float:
    """1.0 if the response's final answer is equivalent to ``reference``, else 0.0.

    ``reference`` is a bare answer (``\\frac{1}{2}``, ``0.5``, ``[1,2)``) or contains a
    ``\\boxed{}``. Never raises.
    """
    try:
        if not isinstance(response, str) or not isinstance(reference, str):
            return 0.0
        gold = last_boxed(reference)
        if gold is None:
            gold = reference.strip()
        if not gold:
            return 0.0
        pred = extract_answer(response)
        if pred is None or not pred.strip():
            return 0.0
        return 1.0 if answers_equivalent(pred, gold) else 0.0
    except Exception:  # garbage in, 0.0 out; SymPy can raise nearly anything
        return 0.0


@register_reference_check("math")
def math_reference_problem(reference: str) -> str | None:
    """None when a response boxing the reference's answer scores 1.0, else why not (an empty answer, an empty
    box, only delimiters). The boxed answer matches its reference by normalised string before SymPy is
    reached, so this costs microseconds per row."""
    gold = last_boxed(reference) if isinstance(reference, str) else None
    if gold is None:
        gold = reference.strip() if isinstance(reference, str) else ""
    if score_math(f"\\boxed{{{gold}}}", reference) == 1.0:
        return None
    return f"expected a final answer the math verifier can match, found {reference!r:.80}"
