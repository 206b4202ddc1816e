"""Toy code tasks for the ``code`` verifier: tiny function problems with tests.

:func:`make_code_tasks` returns a deterministic list (same ``n``/``seed`` -> same
list) of dicts::

    {"prompt": str,              # asks for one function in a ```python block
     "answer": str,              # reference JSON, function-test form:
                                 #   {"fn_name": ..., "tests": [{"input": [args], "output": value}]}
     "canonical_solution": str,  # a correct program (for tests and benchmarks)
     "kind": str, "fn_name": str}

so a job can use ``data.verifier=code`` with ``answer`` as the reference. There are
:data:`KINDS` (20) problem kinds, cycled in order; each task draws its test
arguments from ``random.Random(f"{seed}:{index}")``. Expected outputs are computed
by running the canonical solution here (trusted code, our own), so the reference
and the canonical solution cannot disagree. Pure: imports only the stdlib.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KINDS", "CodeKind", "make_code_tasks", "format_prompt"]


@dataclass(frozen=True)
class CodeKind:
    name: str
    fn_name: str
    signature: str  # e.g. "add(a, b)"
    description: str
    solution: str  # canonical source defining fn_name
    gen_args: Callable[[random.Random], list]  # one test's positional arguments


def _ints(r: random.Random, lo=-50, hi=50, n_lo=1, n_hi=8) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(n_lo, n_hi))]


def _word(r: random.Random, lo=1, hi=8, alphabet="abcdefghijklmnopqrstuvwxyz") -> str:
    return "".join(r.choice(alphabet) for _ in range(r.randint(lo, hi)))


def _sentence(r: random.Random) -> str:
    return " ".join(_word(r) for _ in range(r.randint(1, 5)))


def _palindromish(r: random.Random) -> str:
    w = _word(r, 1, 5, "abc")
    return w + w[::-1][r.randint(0, 1) :] if r.random() < 0.5 else w


KINDS: tuple[CodeKind, ...] = (
    CodeKind(
        "add",
        "add",
        "add(a, b)",
        "returns the sum of the integers a and b",
        "def add(a, b):\n    return a + b\n",
        lambda r: [r.randint(-1000, 1000), r.randint(-1000, 1000)],
    ),
    CodeKind(
        "multiply",
        "multiply",
        "multiply(a, b)",
        "returns the product of the integers a and b",
        "def multiply(a, b):\n    return a * b\n",
        lambda r: [r.randint(-100, 100), r.randint(-100, 100)],
    ),
    CodeKind(
        "reverse_string",
        "reverse_string",
        "reverse_string(s)",
        "returns the string s reversed",
        "def reverse_string(s):\n    return s[::-1]\n",
        lambda r: [_word(r, 0, 10)],
    ),
    CodeKind(
        "max_of_list",
        "max_of_list",
        "max_of_list(xs)",
        "returns the largest element of the non-empty list of integers xs",
        "def max_of_list(xs):\n    return max(xs)\n",
        lambda r: [_ints(r)],
    ),
    CodeKind(
        "min_of_list",
        "min_of_list",
        "min_of_list(xs)",
        "returns the smallest element of the non-empty list of integers xs",
        "def min_of_list(xs):\n    return min(xs)\n",
        lambda r: [_ints(r)],
    ),
    CodeKind(
        "sum_list",
        "sum_list",
        "sum_list(xs)",
        "returns the sum of the list of integers xs (0 if empty)",
        "def sum_list(xs):\n    return sum(xs)\n",
        lambda r: [_ints(r, n_lo=0)],
    ),
    CodeKind(
        "count_vowels",
        "count_vowels",
        "count_vowels(s)",
        "returns how many characters of the lowercase string s are vowels (a, e, i, o, u)",
        "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
        lambda r: [_sentence(r)],
    ),
    CodeKind(
        "is_palindrome",
        "is_palindrome",
        "is_palindrome(s)",
        "returns True if the string s reads the same forwards and backwards, else False",
        "def is_palindrome(s):\n    return s == s[::-1]\n",
        lambda r: [_palindromish(r)],
    ),
    CodeKind(
        "factorial",
        "factorial",
        "factorial(n)",
        "returns n! for an integer 0 <= n <= 20",
        "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out\n",
        lambda r: [r.randint(0, 20)],
    ),
    CodeKind(
        "fibonacci",
        "fibonacci",
        "fibonacci(n)",
        "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1 (0 <= n <= 60)",
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        lambda r: [r.randint(0, 60)],
    ),
    CodeKind(
        "gcd",
        "gcd",
        "gcd(a, b)",
        "returns the greatest common divisor of the positive integers a and b",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        lambda r: [r.randint(1, 500) * r.choice([1, 2, 6]), r.randint(1, 500)],
    ),
    CodeKind(
        "is_prime",
        "is_prime",
        "is_prime(n)",
        "returns True if the integer n (0 <= n <= 10000) is prime, else False",
        "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
        "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
        lambda r: [r.randint(0, 10000)],
    ),
    CodeKind(
        "sort_list",
        "sort_list",
        "sort_list(xs)",
        "returns the list of integers xs sorted in ascending order",
        "def sort_list(xs):\n    return sorted(xs)\n",
        lambda r: [_ints(r, n_lo=0)],
    ),
    CodeKind(
        "unique_sorted",
        "unique_sorted",
        "unique_sorted(xs)",
        "returns the distinct elements of the list of integers xs in ascending order",
        "def unique_sorted(xs):\n    return sorted(set(xs))\n",
        lambda r: [_ints(r, -5, 5, 0, 10)],
    ),
    CodeKind(
        "count_char",
        "count_char",
        "count_char(s, c)",
        "returns how many times the character c occurs in the string s",
        "def count_char(s, c):\n    return s.count(c)\n",
        lambda r: [_word(r, 0, 12, "abcd"), r.choice("abcd")],
    ),
    CodeKind(
        "running_sum",
        "running_sum",
        "running_sum(xs)",
        "returns the list of prefix sums of the list of integers xs",
        "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n"
        "        total += x\n        out.append(total)\n    return out\n",
        lambda r: [_ints(r, n_lo=0)],
    ),
    CodeKind(
        "digit_sum",
        "digit_sum",
        "digit_sum(n)",
        "returns the sum of the decimal digits of the integer n >= 0",
        "def digit_sum(n):\n    return sum(int(d) for d in str(n))\n",
        lambda r: [r.randint(0, 10**9)],
    ),
    CodeKind(
        "capitalize_words",
        "capitalize_words",
        "capitalize_words(s)",
        "returns s (lowercase words separated by single spaces) with the first letter of every word in upper case",
        "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
        lambda r: [_sentence(r)],
    ),
    CodeKind(
        "count_words",
        "count_words",
        "count_words(s)",
        "returns the number of words in s (words separated by single spaces; s is non-empty)",
        "def count_words(s):\n    return len(s.split())\n",
        lambda r: [_sentence(r)],
    ),
    CodeKind(
        "is_anagram",
        "is_anagram",
        "is_anagram(a, b)",
        "returns True if the strings a and b contain the same characters with the same counts, else False",
        "def is_anagram(a, b):\n    return sorted(a) == sorted(b)\n",
        lambda r: (lambda w: [w, "".join(r.sample(w, len(w))) if r.random() < 0.5 else _word(r, 1, 6, "abc")])(
            _word(r, 1, 6, "abc")
        ),
    ),
)


def format_prompt(kind: CodeKind, example_args: list, example_out) -> str:
    call = f"{kind.fn_name}({', '.join(repr(a) for a in example_args)})"
    return (
        f"Write a Python function `{kind.signature}` that {kind.description}.\n"
        f"Example: `{call}` returns `{example_out!r}`.\n"
        "Answer with the complete function in a single ```python code block."
    )


def _compile(kind: CodeKind):
    ns: dict = {}
    exec(kind.solution, ns)  # our own canonical source, not model output
    return ns[kind.fn_name]


def make_code_tasks(n: int = 100, seed: int = 0, tests_per_task: int = 4) -> list[dict]:
    """``n`` toy code tasks (kinds cycled in :data:`KINDS` order), deterministic in
    ``(n, seed, tests_per_task)``; task ``i`` does not depend on ``n``."""
    if n < 0 or tests_per_task < 1:
        raise ValueError("n must be >= 0 and tests_per_task >= 1")
    fns = {k.name: _compile(k) for k in KINDS}
    tasks = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rng = random.Random(f"{seed}:{i}")
        tests = []
        for _ in range(tests_per_task):
            args = kind.gen_args(rng)
            out = fns[kind.name](*json.loads(json.dumps(args)))
            tests.append({"input": args, "output": json.loads(json.dumps(out))})
        tasks.append(
            {
                "prompt": format_prompt(kind, tests[0]["input"], tests[0]["output"]),
                "answer": json.dumps({"fn_name": kind.fn_name, "tests": tests}),
                "canonical_solution": kind.solution,
                "kind": kind.name,
                "fn_name": kind.fn_name,
            }
        )
    return tasks
