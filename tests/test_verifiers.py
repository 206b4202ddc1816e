"""Tests for the ``verifiers`` package: registry, ``math`` and ``arith`` verifiers,
and the process-isolated :class:`verifiers.pool.ScoringPool`.

The pool tests need verifiers that sleep, crash or report their PID. They are
defined at the bottom of *this* module and registered under ``_test_*`` names; the
pools are created with ``plugin_modules=[__name__]`` so each worker imports this
module too (workers otherwise import only ``verifiers``). The built-in package
therefore carries no test-only verifiers.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import verifiers
from verifiers import (
    CHEAP_VERIFIERS,
    VERIFIERS,
    get_verifier,
    register_verifier,
)
from verifiers.arith import score_arith
from verifiers.math_verifier import extract_answer, last_boxed, score_math
from verifiers.pool import ScoringPool, score_one_isolated

PLUGIN = [__name__]
TIMEOUT_S = 1.0
# Generous slack for a 2-core CI box: timeouts must resolve well before this.
MARGIN_S = 3.0


# --------------------------------------------------------------------------- registry


def test_builtins_registered():
    assert {"math", "arith"} <= set(VERIFIERS)
    assert get_verifier("math") is score_math
    assert get_verifier("arith") is score_arith
    assert "arith" in CHEAP_VERIFIERS and "math" not in CHEAP_VERIFIERS
    assert verifiers.is_cheap("arith") and not verifiers.is_cheap("math")


def test_unknown_verifier_error_is_one_line_and_lists_known():
    with pytest.raises(ValueError) as ei:
        get_verifier("nope")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "'nope'" in msg and "arith" in msg and "math" in msg


def test_register_conflict_and_bad_name():
    with pytest.raises(ValueError):

        @register_verifier("arith")
        def other(response, reference):  # different function, taken name
            return 0.0

    assert get_verifier("arith") is score_arith
    with pytest.raises(ValueError):
        register_verifier("")


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"first \boxed{1}, finally \boxed{2}", "2"),  # last wins
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\fbox{7}", "7"),
        (r"\boxed 5 done", "5"),
        (r"unbalanced \boxed{3", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"blah \boxed{1} then \boxed{x+1}", "x+1"),
        ("The answer is 42.", "42"),
        (r"**Answer:** $\frac12$", r"\frac12"),
        ("0.5", "0.5"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        ("We had 3 apples and ate 1, so 2 are left", "2"),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response, reference",
    [
        (r"Thus \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        ("2.0", "2"),
        (r"\boxed{2}", "2.0"),
        (r"\boxed{\dfrac{1}{2}}", r"\tfrac12"),
        (r"\boxed{\{2,1\}}", r"\{1,2\}"),  # sets are unordered
        (r"\boxed{[1,2)}", "[1,2)"),  # intervals
        (r"\boxed{(-\infty, 2]}", r"(-\infty,2]"),
        (r"\boxed{\frac{1}{2}\sqrt{3}}", r"\frac{\sqrt{3}}{2}"),
        ("The answer is 1,000.", "1000"),
        (r"x = 3, so \boxed{x=3}", "3"),
        ("so the result is 7", r"\boxed{7}"),  # boxed reference is unwrapped
    ],
)
def test_math_equivalent(response, reference):
    assert score_math(response, reference) == 1.0


@pytest.mark.parametrize(
    "response, reference",
    [
        (r"\boxed{3}", "2"),
        (r"\boxed{1} and finally \boxed{2}", "1"),  # only the last box counts
        (r"\boxed{[1,2)}", "(1,2]"),
        (r"\boxed{0.33}", r"\frac{1}{3}"),
        (r"\boxed{3\pi}", "3"),
    ],
)
def test_math_wrong(response, reference):
    assert score_math(response, reference) == 0.0


@pytest.mark.parametrize(
    "response, reference",
    [
        ("", "1"),
        ("   \n ", "1"),
        (r"\boxed{", "1"),
        (r"\boxed{}", "1"),
        ("\x00\xff\ud800" * 50, "1"),
        ("}}}{{{\\\\\\$$$^^^", "1"),
        (r"\boxed{\frac{}{}}", "1"),
        ("just words, no numbers at all", "1"),
        (r"\boxed{2}", ""),
        (None, "1"),
        (r"\boxed{2}", None),
        (12, 12),
    ],
)
def test_math_garbage_scores_zero(response, reference):
    assert score_math(response, reference) == 0.0


def test_math_works_off_main_thread():
    # math-verify's own timeout would call signal.alarm here and fail; ours is off.
    out = []
    t = threading.Thread(target=lambda: out.append(score_math(r"\boxed{\frac{2}{4}}", "0.5")))
    t.start()
    t.join(30)
    assert out == [1.0]


# --------------------------------------------------------------------------- arith


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("C579", "579", 1.0),
        ("N579", "579", 1.0),
        ("579", "579", 1.0),
        ("C579", " 579\n", 1.0),  # reference whitespace stripped
        ("C12 then 579", "579", 1.0),  # last digit run wins
        ("C579 then 12", "579", 0.0),
        ("C5790", "579", 0.0),  # maximal run: no prefix/suffix match
        ("C0579", "579", 0.0),  # exact string compare, leading zero counts
        ("C57", "579", 0.0),
        ("C", "579", 0.0),
        ("", "579", 0.0),
        ("C579", "", 0.0),
        ("C\u0665", "5", 0.0),  # Arabic-Indic digit is not an ASCII digit
        ("C-5", "-5", 0.0),  # no sign handling: generator emits non-negatives
        (None, "5", 0.0),
    ],
)
def test_arith(response, reference, expected):
    assert score_arith(response, reference) == expected


# --------------------------------------------------------------------------- pool


@pytest.fixture(scope="module")
def pool():
    with ScoringPool(2, TIMEOUT_S, plugin_modules=PLUGIN) as p:
        yield p


def test_pool_preserves_order_chunked(pool):
    refs = [str(i) for i in range(300)]
    resps = [f"C{i}" if i % 3 else f"N{i + 1}" for i in range(300)]
    expected = [score_arith(r, g) for r, g in zip(resps, refs)]
    assert 0 < sum(expected) < 300
    assert pool.score_batch("arith", resps, refs) == expected


def test_pool_preserves_order_math(pool):
    resps = [r"\boxed{\frac12}", r"\boxed{3}", "2.0", r"\boxed{"]
    refs = ["0.5", "2", "2", "1"]
    assert pool.score_batch("math", resps, refs) == [1.0, 0.0, 1.0, 0.0]


def test_pool_input_errors(pool):
    assert pool.score_batch("arith", [], []) == []
    with pytest.raises(ValueError, match="unknown verifier"):
        pool.score_batch("nope", ["1"], ["1"])
    with pytest.raises(ValueError):
        pool.score_batch("arith", ["1", "2"], ["1"])


def test_pool_sanitizes_scores(pool):
    assert pool.score_batch("_test_value", ["raise", "nan", "5", "-1", "0.25", "str"], ["x"] * 6) == [
        0.0,
        0.0,
        1.0,
        0.0,
        0.25,
        0.0,
    ]


def test_pool_runs_in_parallel(pool):
    scores = pool.score_batch("_test_pid", ["x"] * 6, ["0.3"] * 6)
    pids = {round(s * 2**22) for s in scores}
    assert os.getpid() not in pids
    assert len(pids) > 1


def test_pool_timeout_zeroes_only_offender(pool):
    t0 = time.monotonic()
    scores = pool.score_batch("_test_sleep", ["a", "b", "c"], ["0", "30", "0"])
    elapsed = time.monotonic() - t0
    assert scores == [1.0, 0.0, 1.0]
    assert elapsed < TIMEOUT_S + MARGIN_S
    # The killed worker was replaced: the pool still works.
    assert pool.score_batch("arith", ["C7", "C8"], ["7", "7"]) == [1.0, 0.0]
    assert pool.score_batch("_test_sleep", ["a", "b"], ["0", "0"]) == [1.0, 1.0]


def test_pool_chunk_timeout_falls_back_to_single_samples(pool):
    # _test_cheap_hang is cheap, so it is sent in chunks; the chunk holding the
    # hanging sample times out and is re-scored one sample per task.
    refs = ["ok", "ok", "hang", "ok", "ok", "ok"]
    t0 = time.monotonic()
    scores = pool.score_batch("_test_cheap_hang", ["x"] * 6, refs)
    elapsed = time.monotonic() - t0
    assert scores == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert elapsed < 2 * TIMEOUT_S + MARGIN_S


@pytest.mark.parametrize("how", ["exit", "segv"])
def test_pool_worker_crash_zeroes_only_offender(pool, how):
    scores = pool.score_batch("_test_crash", ["x"] * 4, ["ok", how, "ok", "ok"])
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert pool.score_batch("arith", ["C1"], ["1"]) == [1.0]


def test_pool_from_non_main_thread(pool):
    out = []

    def work():
        out.append(pool.score_batch("_test_sleep", ["a", "b"], ["0", "30"]))
        out.append(pool.score_batch("math", [r"\boxed{\frac{1}{2}}"], ["0.5"]))

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert out == [[1.0, 0.0], [1.0]]


def test_pool_verifier_missing_in_workers_is_loud(pool):
    @register_verifier("_test_parent_only")
    def parent_only(response, reference):
        return 1.0

    try:
        with pytest.raises(RuntimeError, match="_test_parent_only"):
            pool.score_batch("_test_parent_only", ["x"], ["y"])
    finally:
        VERIFIERS.pop("_test_parent_only", None)


def test_pool_closed_and_options():
    p = ScoringPool(1, 5.0, start_method="spawn")
    assert p.start_method == "spawn"
    p.close()
    p.close()  # idempotent
    with pytest.raises(RuntimeError):
        p.score_batch("arith", ["1"], ["1"])
    with pytest.raises(ValueError):
        ScoringPool(1, 1.0, start_method="fork")
    with pytest.raises(ValueError):
        ScoringPool(0, 1.0)
    with pytest.raises(ValueError, match="startup_timeout_s"):
        ScoringPool(1, 1.0, startup_timeout_s=0)


UNGUARDED_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from verifiers.pool import ScoringPool
if __name__ != "__main__":  # a worker re-importing this unguarded script: the script's long work runs there
    time.sleep(600)
print(ScoringPool(1, 5.0, startup_timeout_s=5).score("arith", "C42", "42"))
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_that_never_start_fail_the_pool_at_once_naming_the_unguarded_main(tmp_path, start_method):
    """An entry script without `if __name__ == "__main__":` runs its own work in every worker that re-imports it: the
    pool's start-up probe refuses within startup_timeout_s instead of every batch waiting out its deadline."""
    import contextlib
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    text = UNGUARDED_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]))
    script.write_text(text.replace("ScoringPool(1, 5.0,", f"ScoringPool(1, 5.0, start_method={start_method!r},"))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:  # the script's session: a worker the pool failed to stop would sleep on
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert "RuntimeError: scoring workers did not start within 5 s (1 of 1 not done)" in last
    assert "if __name__ == '__main__':" in last


def test_score_one_isolated():
    assert score_one_isolated("arith", "C42", "42", timeout_s=5.0) == 1.0


# --------------------------------------------------------------------------- test-only verifiers
# Imported by the pool workers through plugin_modules=[__name__].


@register_verifier("_test_sleep")
def _test_sleep(response: str, reference: str) -> float:
    """Sleep float(reference) seconds, then score 1.0."""
    time.sleep(float(reference))
    return 1.0


@register_verifier("_test_pid")
def _test_pid(response: str, reference: str) -> float:
    """Sleep float(reference) s, return the worker PID encoded exactly as pid / 2**22."""
    time.sleep(float(reference))
    return os.getpid() / 2**22


@register_verifier("_test_crash")
def _test_crash(response: str, reference: str) -> float:
    """Kill the worker process (os._exit or a segfault) on demand."""
    if reference == "exit":
        os._exit(3)
    if reference == "segv":
        import ctypes

        ctypes.string_at(0)
    return 1.0


@register_verifier("_test_cheap_hang", cheap=True)
def _test_cheap_hang(response: str, reference: str) -> float:
    """A 'cheap' verifier that hangs on reference 'hang'."""
    if reference == "hang":
        time.sleep(30)
    return 1.0


@register_verifier("_test_value")
def _test_value(response: str, reference: str):
    """Return odd values (keyed by the response) to exercise score sanitisation."""
    if response == "raise":
        raise RuntimeError("boom")
    if response == "str":
        return "not a number"
    return float(response)
