"""Which tensors a weight extrapolation moves: name-pattern rules shared by every extrapolator.

The offline CLI (``python -m orchestrator.extrapolate``) and the in-loop extrapolator decide tensor by tensor,
from the tensor's *name* alone, whether it is projected (``W ← A + β (W − A)``) or left as the later weights
(for a checkpoint pair: copied from t1). Both use :class:`TensorSelector`, so one set of patterns means the
same thing everywhere.

Pattern syntax — shell-style globs (``fnmatch.fnmatchcase``), matched against the *whole* tensor name,
case-sensitively:

- ``*`` matches any run of characters, dots included (``*norm*`` matches ``model.layers.0.input_layernorm.weight``;
  ``model.layers.1.*`` matches everything in layer 1);
- ``?`` matches one character; ``[abc]`` / ``[0-9]`` / ``[!0-9]`` match one character from (not from) a set.

A name is selected when it matches at least one ``include`` pattern and no ``exclude`` pattern (exclude wins).

Defaults: include everything, exclude normalisation layers (:data:`DEFAULT_EXCLUDE`). The paper finds norm
weights non-linear and its official code copies them from the later checkpoint; DESIGN.md makes that the
default here too. Names under a ``module.`` / ``_orig_mod.`` wrapper prefix are covered because every default
pattern either starts with ``*`` or has a ``*.``-prefixed twin.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_INCLUDE", "DEFAULT_EXCLUDE", "TensorSelector", "validate_pattern"]

DEFAULT_INCLUDE: tuple[str, ...] = ("*",)

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*[Nn]orm*",  # input_layernorm, post_attention_layernorm, model.norm, q_norm/k_norm, layer_norm, LayerNorm
    "ln_*",  # GPT-2 / GPT-J / Falcon style at the top level: ln_f, ln_1, ln_2, ln_attn, ln_mlp
    "*.ln_*",  # the same inside a module: transformer.ln_f.weight, transformer.h.0.ln_1.bias
)
"""Normalisation layers, by the names used in HF LLMs (Llama/Qwen/Mistral ``*norm*``, GPT-2 ``ln_*``)."""


def validate_pattern(pattern: object, what: str = "pattern") -> str:
    """Return ``pattern`` if it is a usable glob, else raise a one-line ``ValueError`` naming ``what``.

    Rejected: non-strings, empty or all-blank strings, and an unclosed ``[`` character class (``fnmatch``
    would silently read it as a literal ``[``, which is never what a tensor-name pattern means).
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{what} {pattern!r}: expected a string (a glob such as '*norm*')")
    if not pattern.strip():
        raise ValueError(f"{what} {pattern!r}: empty pattern (a glob such as '*norm*')")
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":  # a leading ']' is a literal member of the class
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                raise ValueError(
                    f"{what} {pattern!r}: unclosed '[' at position {i} "
                    "(globs: * ? [abc] [!abc]; write [[] for a literal '[')"
                )
            i = close + 1
        else:
            i += 1
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as e:  # pragma: no cover - fnmatch.translate escapes everything it does not understand
        raise ValueError(f"{what} {pattern!r}: not a valid glob ({e})") from None
    return pattern


def _patterns(value: str | Iterable[str] | None, default: Sequence[str], what: str) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    if isinstance(value, str):  # a single pattern, not a sequence of one-character patterns
        value = [value]
    return tuple(validate_pattern(p, what) for p in value)


class TensorSelector:
    """Name-based selection of the tensors to project (see the module docstring for the pattern syntax).

    Args:
        include: globs; a tensor must match at least one (default ``["*"]``: every tensor). An empty list
            selects nothing.
        exclude: globs; a tensor matching any is not selected (default :data:`DEFAULT_EXCLUDE`: norm layers).
            An empty list excludes nothing.

    Raises:
        ValueError: one line naming the bad pattern, e.g. ``exclude pattern '[ab': unclosed '[' at position 0 ...``.
    """

    __slots__ = ("include", "exclude", "_inc", "_exc")

    def __init__(
        self,
        include: str | Iterable[str] | None = DEFAULT_INCLUDE,
        exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE,
    ) -> None:
        self.include: tuple[str, ...] = _patterns(include, DEFAULT_INCLUDE, "include pattern")
        self.exclude: tuple[str, ...] = _patterns(exclude, DEFAULT_EXCLUDE, "exclude pattern")
        self._inc = self._compile(self.include)
        self._exc = self._compile(self.exclude)

    @staticmethod
    def _compile(patterns: tuple[str, ...]):
        if not patterns:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))

    def selected(self, name: str) -> bool:
        """True when ``name`` matches an include pattern and no exclude pattern."""
        if self._inc is None or not self._inc.match(name):
            return False
        return self._exc is None or not self._exc.match(name)

    __call__ = selected

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(selected, not_selected)``, each in the order of ``names``."""
        sel, rest = [], []
        for n in names:
            (sel if self.selected(n) else rest).append(n)
        return sel, rest

    def to_dict(self) -> dict[str, list[str]]:
        """The patterns, e.g. for a log or a config dump."""
        return {"include": list(self.include), "exclude": list(self.exclude)}

    def __repr__(self) -> str:
        return f"TensorSelector(include={list(self.include)!r}, exclude={list(self.exclude)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorSelector):
            return NotImplemented
        return self.include == other.include and self.exclude == other.exclude

    def __hash__(self) -> int:
        return hash((self.include, self.exclude))
