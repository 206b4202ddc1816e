"""The suite's rule on outcomes (tests/conftest.py): every way pytest has to skip a test is reported as a failure
naming the reason, in a pytest session of its own that loads the same conftest; passing tests still pass."""

from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def test_every_kind_of_skip_fails_with_its_reason(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_skips="""
        import pytest

        def test_runs():
            assert True

        def test_skip_call():
            pytest.skip("no frobnicator")

        @pytest.mark.skipif(True, reason="not on this machine")
        def test_skipif():
            pass

        def test_importorskip():
            pytest.importorskip("a_module_that_is_not_installed")

        @pytest.fixture
        def needs_setup():
            pytest.skip("fixture gave up")

        def test_skip_in_fixture(needs_setup):
            pass

        @pytest.mark.parametrize("x", [])
        def test_empty_parametrization(x):
            pass
        """,
        test_module_skip="""
        import pytest

        pytest.skip("the whole module", allow_module_level=True)

        def test_never_collected():
            pass
        """,
    )
    result = pytester.runpytest("test_skips.py", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    # skips in the call fail the test; skips while setting it up (skipif, a fixture, no parameters) are errors
    assert outcomes == {"passed": 1, "failed": 2, "errors": 3} and result.ret == 1
    text = result.stdout.str()
    for reason in ["no frobnicator", "not on this machine", "a_module_that_is_not_installed", "fixture gave up"]:
        assert reason in text, reason
    # one report body per test (the short summary repeats them, truncated or not depending on the terminal width)
    bodies = [line for line in text.splitlines() if line.startswith("skipped, and a skip is a failure in this suite")]
    assert "got empty parameter set" in text and len(bodies) == 5

    result = pytester.runpytest("test_module_skip.py", "-p", "no:cacheprovider")
    assert result.parseoutcomes() == {"errors": 1} and result.ret != 0
    assert "a skip is a failure in this suite (`make setup` installs what the tests need): " in result.stdout.str()
    assert "the whole module" in result.stdout.str()
