"""MLflow tracking (orchestrator/tracking.py) on a real SQLite store, no Ray: the experiment is tagged as model
training (and a kind someone already chose is kept), and a job's run name says what distinguishes it."""

from __future__ import annotations

import re

import pytest

from orchestrator.config import validate
from orchestrator.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, Tracker, local_artifact_location
from tests.helpers import compose_cfg

STAMP = r"\d{8}-\d{6}"


def tracker(tmp_path, *overrides: str) -> Tracker:
    cfg = validate(compose_cfg([f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]))
    return Tracker(cfg)


@pytest.fixture(autouse=True)
def no_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_name(t: Tracker) -> str:
    return t.client.get_run(t.run_id).info.run_name


def test_run_names_tell_schedules_strategies_and_data_apart(tmp_path):
    assert re.fullmatch(f"grpo-rl_extra-lookahead-fixed-toy_add2-{STAMP}", run_name(tracker(tmp_path)))
    assert re.fullmatch(f"grpo-rl_extra-auto-toy_add2-{STAMP}", run_name(tracker(tmp_path, "schedule=rl_extra")))
    assert re.fullmatch(f"grpo-rl-toy_add2-{STAMP}", run_name(tracker(tmp_path, "schedule=rl")))
    rank1 = tracker(tmp_path, "schedule=rl_extra", "schedule.strategy=rank1")
    assert re.fullmatch(f"grpo-rl_extra-rank1-auto-toy_add2-{STAMP}", run_name(rank1))
    named = tracker(
        tmp_path, "algo=gspo", "schedule=rl_extra", "schedule.beta_mode=adaptive", "data=toy_mul", "data.toy.digits=3"
    )
    assert re.fullmatch(f"gspo-rl_extra-adaptive-toy_mul3-{STAMP}", run_name(named))
    assert re.fullmatch(f"grpo-rl-toy_code-{STAMP}", run_name(tracker(tmp_path, "schedule=rl", "data=toy_code")))
    hf = ["model=hf", f"model.path={tmp_path}", "rollout.max_model_len=2048"]
    files = tracker(
        tmp_path,
        *hf,
        "data=files",
        f"data.train_files=[{tmp_path / 'gsm8k_train.jsonl'},{tmp_path / 'more.jsonl'}]",
        f"data.eval_files={tmp_path / 'test.jsonl'}",
    )
    assert re.fullmatch(f"grpo-rl_extra-lookahead-fixed-gsm8k_train-{STAMP}", run_name(files))
    hub = tracker(tmp_path, *hf, "data=hub", "data.hub_id=org/MATH-lighteval")
    assert re.fullmatch(f"grpo-rl_extra-lookahead-fixed-MATH-lighteval-{STAMP}", run_name(hub))
    assert run_name(tracker(tmp_path, "tracking.run_name=my-baseline")) == "my-baseline"


def test_experiment_is_tagged_as_model_training_once(tmp_path):
    t = tracker(tmp_path, "tracking.experiment=fresh")
    assert t.client.get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING

    # an experiment made elsewhere (here: without tags) gets the tag on the next job ...
    old = t.client.create_experiment("made-by-hand")
    t = tracker(tmp_path, "tracking.experiment=made-by-hand")
    assert t.experiment_id == old
    assert t.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    # ... but a kind a person chose in the UI stays
    t.client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")
    tracker(tmp_path, "tracking.experiment=made-by-hand")
    assert t.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_new_experiment_keeps_its_artifacts_beside_its_sqlite_store(tmp_path, monkeypatch):
    """Not in ./mlruns of the launch directory (a `ray job submit` driver's is a temporary copy)."""
    launch_dir, store_dir = tmp_path / "launch", tmp_path / "store"
    launch_dir.mkdir()
    store_dir.mkdir()
    monkeypatch.chdir(launch_dir)
    t = tracker(store_dir, "tracking.experiment=team/exp 1")
    t.log_text("hello", "note.txt")
    exp_dir = store_dir / "mlruns" / "team_exp_1"
    assert t.client.get_experiment(t.experiment_id).artifact_location == str(exp_dir)
    assert (exp_dir / t.run_id / "artifacts" / "note.txt").read_text() == "hello"
    assert list(launch_dir.iterdir()) == []
    # a relative store is relative to the launch directory, and so are its artifacts
    rel = Tracker(validate(compose_cfg(["tracking.tracking_uri=sqlite:///rel.db", "tracking.experiment=rlextra"])))
    assert rel.client.get_experiment(rel.experiment_id).artifact_location == str(launch_dir / "mlruns" / "rlextra")
    # an experiment that exists keeps the location it was made with
    old = t.client.create_experiment("made-by-hand", artifact_location=str(tmp_path / "elsewhere"))
    assert tracker(store_dir, "tracking.experiment=made-by-hand").experiment_id == old
    assert t.client.get_experiment(old).artifact_location == str(tmp_path / "elsewhere")
    # a tracking server chooses its own artifact root
    assert local_artifact_location("http://mlflow:5000", "rlextra") is None
