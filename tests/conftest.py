"""Shared fixtures: a quickly warm-started tiny model, its toy data, and one local Ray for the session.

The tiny model here gets only a few SFT steps: the tests check mechanics and numerics, not accuracy
(the default job's warm start is what reaches 20–60 %).
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
