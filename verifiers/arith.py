"""``arith`` verifier for the synthetic arithmetic toy task.

Task contract (shared with the data generator): the prompt is an expression such as
``123+456=`` or ``47*6=``; the response is a one-letter mode token (a "reasoning
style" word such as ``C`` or ``N``) followed by the digits of the answer, e.g.
``C579``; the reference is the correct answer as a decimal string, e.g. ``579``.

Score: 1.0 if the *last maximal run of ASCII digits* in the response equals the
reference (leading/trailing whitespace of the reference stripped), else 0.0. The
mode token is ignored, so the reward does not depend on which style was chosen.
Only ``[0-9]`` count as digits (not other Unicode digits), and there is no sign
handling: a negative reference such as ``-5`` never matches, so the generator must
only produce non-negative answers. Pure and microsecond-cheap, hence registered
with ``cheap=True`` (the scoring pool batches it).
"""

from __future__ import annotations

import re

from . import register_reference_check, register_verifier

__all__ = ["score_arith", "last_digit_run", "arith_reference_problem"]

_DIGIT_RUN = re.compile(r"[0-9]+")


def last_digit_run(text: str) -> str | None:
    """Return the last maximal run of ASCII digits in ``text``, or ``None``."""
    last = None
    for m in _DIGIT_RUN.finditer(text):
        last = m.group(0)
    return last


@register_verifier("arith", cheap=True)
def score_arith(response: str, reference: str) -> float:
    """1.0 if the last digit run of ``response`` equals ``reference.strip()``, else 0.0.

    Never raises: non-string input scores 0.0.
    """
    if not isinstance(response, str) or not isinstance(reference, str):
        return 0.0
    ref = reference.strip()
    if not ref:
        return 0.0
    return 1.0 if last_digit_run(response) == ref else 0.0


@register_reference_check("arith")
def arith_reference_problem(reference: str) -> str | None:
    """None when the reference itself scores 1.0 (a run of ASCII digits), else why not."""
    if score_arith(reference, reference) == 1.0:
        return None
    return f"expected a non-negative integer answer (digits only) for the arith verifier, found {reference!r:.80}"
