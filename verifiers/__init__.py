"""Reward verifiers for rlextra: ``score(response, reference) -> float`` in [0, 1].

This package is self-contained (it imports nothing else from rlextra) so that the
scoring worker processes of :class:`verifiers.pool.ScoringPool` can import it, and
only it, without dragging in torch, Ray or the trainer.

Registry
--------
``VERIFIERS`` maps a name to a verifier function ``score(response: str, reference: str)
-> float``. A verifier is registered with the :func:`register_verifier` decorator and
looked up with :func:`get_verifier`. Importing this package registers the built-ins:

* ``math``  -- final-answer equivalence with the ``math-verify`` library
  (:mod:`verifiers.math_verifier`);
* ``arith`` -- exact match of the last digit run, for the synthetic arithmetic
  toy task (:mod:`verifiers.arith`);
* ``code`` / ``code_strict`` -- run the response's last Python block against
  stdin or function tests in a sandbox (namespaces, rlimits, privilege drop):
  fraction of tests passed / all-or-nothing (:mod:`verifiers.code`; toy tasks in
  :mod:`verifiers.code_tasks`).

``REFERENCE_CHECKS`` maps a verifier name to ``problem(reference) -> str | None``: why
no response can ever score 1.0 against that reference answer (``None``: some can).
The trainer runs it over the data's reference answers before training starts
(:func:`reference_problem`); register one with :func:`register_reference_check`.
Each built-in shows a response that scores 1.0 where one exists (``arith``: the
reference itself; ``math``: the reference's answer boxed) and parses the tests
where no response can be built from the reference (``code``).

A verifier registered with ``cheap=True`` is pure and fast (microseconds); the pool
scores such verifiers in chunks of samples per worker task instead of one task per
sample (see :mod:`verifiers.pool`). ``CHEAP_VERIFIERS`` holds their names.

Verifiers defined outside this package (a code sandbox, a test helper) register
themselves the same way when their module is imported; pass that module's name to
``ScoringPool(plugin_modules=...)`` so the scoring workers import it too.

Choices made
------------
* The math verifier lives in ``math_verifier.py``, not ``math.py``: a ``verifiers/math.py``
  would not shadow the stdlib for absolute imports, but it would as soon as the
  package directory itself lands on ``sys.path`` (running a file from inside it,
  some tools), and ``verifiers.math`` next to ``import math`` reads ambiguously.
  The registered *name* is still ``"math"``.
* Re-registering a name with a function of the same qualified name replaces it
  (a module imported twice, e.g. once as ``__mp_main__`` in a worker); a different
  function under an existing name is an error.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "VERIFIERS",
    "CHEAP_VERIFIERS",
    "Verifier",
    "register_verifier",
    "get_verifier",
    "is_cheap",
    "REFERENCE_CHECKS",
    "register_reference_check",
    "reference_problem",
]

Verifier = Callable[[str, str], float]

#: name -> verifier function ``score(response, reference) -> float`` in [0, 1].
VERIFIERS: dict[str, Verifier] = {}

#: names of verifiers registered with ``cheap=True`` (scored in chunks by the pool).
CHEAP_VERIFIERS: set[str] = set()

ReferenceCheck = Callable[[str], "str | None"]

#: name -> ``problem(reference) -> str | None``: one line ``expected ..., found ...`` when no
#: response can score 1.0 against ``reference``, else ``None``. Cheap: run on every data row.
REFERENCE_CHECKS: dict[str, ReferenceCheck] = {}


def register_verifier(name: str, *, cheap: bool = False) -> Callable[[Verifier], Verifier]:
    """Decorator registering ``fn`` as verifier ``name`` in :data:`VERIFIERS`.

    ``cheap=True`` marks a pure, microsecond-scale verifier that the scoring pool may
    batch many samples per worker task. Returns ``fn`` unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"verifier name must be a non-empty string, got {name!r}")

    def decorator(fn: Verifier) -> Verifier:
        if not callable(fn):
            raise TypeError(f"verifier {name!r} must be callable, got {type(fn).__name__}")
        old = VERIFIERS.get(name)
        if (
            old is not None
            and old is not fn
            and (getattr(old, "__qualname__", None) != getattr(fn, "__qualname__", None))
        ):
            raise ValueError(
                f"verifier {name!r} is already registered to "
                f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', '?')}"
            )
        VERIFIERS[name] = fn
        if cheap:
            CHEAP_VERIFIERS.add(name)
        else:
            CHEAP_VERIFIERS.discard(name)
        return fn

    return decorator


def get_verifier(name: str) -> Verifier:
    """Return the verifier registered as ``name``.

    Raises a one-line ``ValueError`` naming the unknown verifier and listing the
    known ones.
    """
    try:
        return VERIFIERS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(VERIFIERS)) or "(none)"
        raise ValueError(f"unknown verifier {name!r}; known verifiers: {known}") from None


def is_cheap(name: str) -> bool:
    """Whether verifier ``name`` was registered with ``cheap=True``."""
    return name in CHEAP_VERIFIERS


def register_reference_check(*names: str) -> Callable[[ReferenceCheck], ReferenceCheck]:
    """Decorator registering ``check`` as the reference check of verifiers ``names``. Returns it unchanged."""

    def decorator(check: ReferenceCheck) -> ReferenceCheck:
        for name in names:
            REFERENCE_CHECKS[name] = check
        return check

    return decorator


def reference_problem(name: str, reference: str) -> str | None:
    """Why verifier ``name`` can never give ``reference`` a full score (one line), or ``None``; also ``None`` for
    a verifier without a registered check."""
    check = REFERENCE_CHECKS.get(name)
    return check(reference) if check is not None else None


# Register the built-ins (after the registry exists: the submodules import it).
from . import arith as arith  # noqa: E402
from . import code as code  # noqa: E402
from . import math_verifier as math_verifier  # noqa: E402
