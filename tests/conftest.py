"""Shared fixtures: a quickly warm-started tiny model, its toy data, and one local Ray for the session; and the
suite's one rule about outcomes: a skipped test is a failed test.

The tiny model here gets only a few SFT steps: the tests check mechanics and numerics, not accuracy
(the default job's warm start is what reaches 20–60 %).

A skip is a test that did not run, so every skip (`pytest.skip`, `skipif`, `importorskip`, a module-level skip, an
empty parametrization) is reported as a failure, with its reason: `make setup` installs everything the suite needs.
These are conftest hooks rather than a command-line option so that `make test`, `.ci/run` and a developer's own
`pytest tests/...` all obey them, and nothing can call pytest without them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Actors started by Ray import the project from the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

pytest_plugins = ("pytester",)  # tests/test_suite_rules.py runs these hooks in a pytest of its own

SKIP_IS_FAILURE = "skipped, and a skip is a failure in this suite (`make setup` installs what the tests need)"


def _fail_skip(report) -> None:
    """Turn a skipped report into a failed one that says why the test was skipped."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{SKIP_IS_FAILURE}: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.skipped:  # pytest.skip(allow_module_level=True), importorskip at import time
        _fail_skip(report)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlextra-cache")


@pytest.fixture(scope="session")
def toy_model_path(cache_dir) -> str:
    """A tied-embedding tiny Qwen2 warm-started on 1-digit addition (~10 s; samples ~50 % correct)."""
    from orchestrator.config import TinyModelConfig, ToyTaskConfig, WarmStartConfig
    from orchestrator.toy_task import prepare_toy_model

    return str(
        prepare_toy_model(
            cache_dir,
            ToyTaskConfig(op="add", digits=1, num_train=2000, num_eval=40),
            TinyModelConfig(tie_word_embeddings=True),
            WarmStartConfig(steps=120, batch_size=64, lr=3e-3),
            seed=0,
            log=lambda *_: None,
        )
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs actors; shut down at the end of the session."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
