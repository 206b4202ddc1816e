"""End to end: a short real job (Ray + vLLM + DeepSpeed + MLflow) whose metrics are read back from MLflow,
and the CLI's handling of bad config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import compose_cfg, run_cli_batch, small_job_overrides


@pytest.mark.slow
def test_short_job_logs_to_mlflow(ray_session, cache_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(small_job_overrides(cache_dir, tmp_path))
    summary = run_job(cfg, str(tmp_path / "out"))

    for key in ("rl_steps", "eval_accuracy_before", "eval_accuracy_after", "wall_time_s", "mlflow_run_id"):
        assert key in summary
    assert summary["rl_steps"] == 3
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["mlflow_run_id"] == summary["mlflow_run_id"]
    hf_dir = Path(summary["final_checkpoint"])
    assert hf_dir.name == "hf" and hf_dir.parent.name == "rl_step_3" and (hf_dir / "config.json").exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["learner.zero_stage"] == "2" and run.data.params["algo.name"] == "grpo"
    for name in (
        "train/reward_mean",
        "train/loss",
        "train/clip_frac",
        "train/kl_behaviour",
        "train/entropy",
        "train/response_length",
        "perf/tokens_per_s",
        "time/rollout_s",
        "time/reward_s",
        "time/learn_s",
        "time/sync_s",
    ):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2, 3], name
    rewards = [m.value for m in client.get_metric_history(run.info.run_id, "train/reward_mean")]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    evals = client.get_metric_history(run.info.run_id, "eval/avg_at_k")
    assert sorted(m.step for m in evals) == [0, 2, 3]
    versions = [m.value for m in client.get_metric_history(run.info.run_id, "perf/weight_version")]
    assert versions == [1.0, 2.0, 3.0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, extra",
    [
        ("gspo", []),
        ("reinforce_pp", []),
        ("reinforce_pp_baseline", []),
        ("drgrpo", ["trainer.updates_per_batch=2"]),  # two passes a batch, then the cycle's projection
        ("grpo", ["algo.kl_coef=0.05", "learner.world_size=2", "learner.zero_stage=3", "learner.micro_batch_size=8"]),
    ],
)
def test_each_algorithm_trains_end_to_end(ray_session, cache_dir, tmp_path, monkeypatch, algo, extra):
    """Three real RL steps per algorithm inside the RL-Extra schedule (m=1, n=1: a projection after each step but the
    last); drgrpo with two optimizer steps per batch (the LR schedule and the cycles still count RL steps); the last
    case with a KL-to-reference term on 2-rank ZeRO-3."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = small_job_overrides(cache_dir, tmp_path, steps=3) + [
        f"algo={algo}",
        "trainer.eval_every=0",
        "trainer.save_final=false",
        "schedule=rl_extra",
        "schedule.m=1",
        "schedule.n=1",
        "schedule.beta_mode=schedule",
        "schedule.selection=names",
        *extra,
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    assert summary["projections_made"] == 2 and summary["virtual_steps"] == 5  # none after the last step
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["algo.name"] == algo and run.info.status == "FINISHED"
    assert run.data.params["trainer.updates_per_batch"] == ("2" if "trainer.updates_per_batch=2" in extra else "1")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 3 and all(m.value == m.value for m in losses)  # finite (not NaN)
    grad = client.get_metric_history(run.info.run_id, "train/grad_norm")
    assert all(m.value > 0 for m in grad), "the policy received a gradient"
    passes = 2 if "trainer.updates_per_batch=2" in extra else 1
    steps = [m.value for m in client.get_metric_history(run.info.run_id, "train/optimizer_steps")]
    assert steps == [passes * 1, passes * 2, passes * 3], "the learners took updates_per_batch passes a step"
    kl_ref = client.get_metric_history(run.info.run_id, "train/kl_ref")
    if "algo.kl_coef=0.05" in extra:
        assert len(kl_ref) == 3 and kl_ref[0].value == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
        assert kl_ref[1].value > 0  # step 2: the policy has moved away from the reference
    else:
        assert kl_ref == []


@pytest.mark.slow
def test_code_task_job_runs_the_sandboxed_verifier(ray_session, cache_dir, tmp_path, monkeypatch):
    """`data=toy_code`: prompts → vLLM → sandboxed code verifier → learner, one real step."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [o for o in small_job_overrides(cache_dir, tmp_path, steps=1) if not o.startswith("data.toy.")] + [
        "data=toy_code",
        "data.toy.num_train=40",
        "data.toy.num_eval=4",
        "model.warm_start.steps=30",
        "model.warm_start.batch_size=16",
        "trainer.eval_every=0",
        "trainer.save_final=false",
        "trainer.prompts_per_step=4",
        "trainer.samples_per_prompt=2",
        "learner.micro_batch_size=8",
        "rollout.max_tokens=48",
        "rollout.kv_cache_mb=32",
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["data.verifier"] == "code" and run.info.status == "FINISHED"
    reward = client.get_metric_history(run.info.run_id, "train/reward_mean")
    assert len(reward) == 1 and 0.0 <= reward[0].value <= 1.0
    assert client.get_metric_history(run.info.run_id, "time/reward_s")[0].value > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "beta, rolled_back, weight_sync", [(None, 0, "object_store"), (1e45, 2, "object_store"), (None, 0, "collective")]
)
def test_rl_extra_schedule_projects_and_logs_nested_phases(
    ray_session, cache_dir, tmp_path, monkeypatch, beta, rolled_back, weight_sync
):
    """schedule=rl_extra: 2 cycles of (m=2 real, n=3 virtual) steps and a last real step (no projection after
    the job's last step), each phase a nested MLflow run. β = 1e45 overflows fp32 (an injected fault): the
    guard must roll both projections back. With the collective sync, the extrapolator actor's syncs go over the
    job's weight group."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = small_job_overrides(cache_dir, tmp_path, steps=5) + [
        "schedule=rl_extra",
        "schedule.m=2",
        "schedule.n=3",
        "schedule.selection=names",
        f"schedule.beta_mode={'schedule' if beta is None else 'fixed'}",
        f"schedule.beta={'null' if beta is None else beta}",
        "trainer.eval_every=0",
        "trainer.save_final=false",
        f"rollout.weight_sync={weight_sync}",
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    assert summary["rl_steps"] == 5
    assert summary["projections_made"] == 2 - rolled_back and summary["projections_rolled_back"] == rolled_back
    assert summary["virtual_steps"] == 5 + 3 * (2 - rolled_back)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = summary["mlflow_run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    kinds = sorted(r.data.tags["rlextra.kind"] for r in children)
    assert kinds == ["extrapolation_phase"] * 2 + ["rl_phase"] * 3
    for run in children:
        assert run.info.status == "FINISHED"
        if run.data.tags["rlextra.kind"] == "extrapolation_phase":
            assert run.data.metrics["extra/beta_max"] >= (2.5 if beta is None else 1e44)
            assert run.data.metrics["extra/rolled_back"] == float(bool(rolled_back))
            assert 0 < run.data.metrics["extra/projected_frac"] < 1  # norm layers are not projected
            assert run.data.metrics["extra/displacement_norm"] > 0
    versions = [m.value for m in client.get_metric_history(parent, "perf/weight_version")]
    # a kept projection is synced to the engines as a new version; a rolled-back one never left the learners
    expected = [1.0, 2.0, 4.0, 5.0, 7.0] if not rolled_back else [1.0, 2.0, 3.0, 4.0, 5.0]
    assert versions == expected, "each kept projection is synced to the rollout engines as a new version"
    virtual = [m.value for m in client.get_metric_history(parent, "virtual_step")]
    assert virtual == ([1.0, 5.0, 6.0, 10.0, 11.0] if not rolled_back else [1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["adaptive", "adaptive_tie", "guard"])
def test_rl_extra_validation_guard_and_adaptive_beta(ray_session, cache_dir, tmp_path, monkeypatch, mode):
    """adaptive, with steps large enough that candidates validate differently from β = 1 (lr 1e-3): a line search
    keeps only a β the validation test accepts against not projecting (β = 1), the accepted one with the largest
    estimated gain; none accepted is a skip.
    adaptive_tie: a β of 1 + 1e-6 moves no sampled token, so the test cannot accept it: a skip (the shards go back),
    never a projection and never a rollback.
    guard: an injected fault (β = 1e5: finite weights, a wrecked policy) collapses the estimated validation reward,
    and the shards are rolled back."""
    import json

    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = {
        "adaptive": ["schedule.beta_mode=adaptive", "schedule.candidates=[0.5,0.75,1.0]", "learner.lr=1e-3"],
        "adaptive_tie": ["schedule.beta_mode=adaptive", "schedule.beta=1.000001", "schedule.candidates=[1.0]"],
        "guard": ["schedule.beta_mode=fixed", "schedule.beta=1e5", "schedule.guard_margin=0.05"],
    }[mode]
    steps = 3 if mode == "adaptive_tie" else 5  # one extrapolation phase (after step 2) is enough for a tie
    overrides = small_job_overrides(cache_dir, tmp_path, steps=steps) + [
        "schedule=rl_extra",
        "schedule.m=2",
        "schedule.n=2",
        "schedule.validation_prompts=16",
        "schedule.selection=names",
        "trainer.eval_every=0",
        "trainer.save_final=false",
        *extra,
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = summary["mlflow_run_id"]
    exp = client.get_run(parent).info.experiment_id
    phases = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.rlextra.kind = 'extrapolation_phase'"
    )
    cycles = (steps - 1) // 2
    assert len(phases) == cycles
    for run in phases:
        before, after = run.data.metrics["extra/val_reward_before"], run.data.metrics["extra/val_reward_after"]
        assert after >= before, "a kept projection must not validate below β = 1"
    names = [f"rl_extra/extrapolation-{k}.json" for k in range(1, cycles + 1)]
    logs = [json.loads(Path(client.download_artifacts(parent, n, str(tmp_path))).read_text()) for n in names]
    if mode == "adaptive":
        assert all(sorted(log["candidates"]) == ["1.5", "2"] for log in logs)  # 0.75 and 1 of β = 2 (0.5 is β = 1)
        gains = [c["gain"] for log in logs for c in log["candidates"].values()]
        assert any(g != 0 for g in gains), f"nothing to decide: {gains}"
        for log in logs:
            if log["outcome"] == "made":
                kept = log["candidates"][f"{log['beta']:.4g}"]
                accepted = [c["gain"] for c in log["candidates"].values() if c["accepted"]]
                assert kept["accepted"] and kept["gain"] == max(accepted) > 0
                assert log["val_reward_after"] == log["val_reward_before"] + kept["gain"]
            else:
                assert log["outcome"] == "skipped" and not any(c["accepted"] for c in log["candidates"].values())
                assert any("no candidate passed the validation test" in r for r in log["reasons"])
        made = [log for log in logs if log["outcome"] == "made"]
        assert summary["projections_made"] == len(made) and summary["projections_rolled_back"] == 0
        assert summary["projections_made"] + summary["projections_skipped"] == 2  # no gain is a skip, not a fault
        assert summary["virtual_steps"] == 5 + sum(round((log["beta"] - 1) * 2) for log in made)
    elif mode == "adaptive_tie":
        (log,) = logs
        assert log["outcome"] == "skipped" and list(log["candidates"]) == ["1"]  # β = 1.000001
        assert not log["candidates"]["1"]["accepted"]
        assert any("no candidate passed the validation test" in r for r in log["reasons"])
        assert summary["projections_skipped"] == 1 and summary["projections_made"] == 0
        assert summary["projections_rolled_back"] == 0 and summary["virtual_steps"] == steps
    else:
        assert summary["projections_rolled_back"] == 2 and summary["projections_made"] == 0
        assert all(log["outcome"] == "rolled_back" and any("rolled back" in d for d in log["reasons"]) for log in logs)
        assert summary["virtual_steps"] == 5


BAD_VALUES = {
    "learner.zero_stage=4": "learner.zero_stage",
    "learner.dtype=fp8": "learner.dtype",
    "rollout.temperature=0": "rollout.temperature",
    "algo.loss=nope": "algo.loss",
    "trainer.prompts_per_step=5": "learner.micro_batch_size",
    "trainer.updates_per_batch=2": "trainer.updates_per_batch",  # with the default schedule, lookahead
}


@pytest.fixture(scope="module")
def cli_refusals(tmp_path_factory) -> dict:
    """`python -m orchestrator.train <override>` for every bad value and an unknown key, all in one subprocess
    (tests/cli_batch.py): override → (CompletedProcess, its folder)."""

    def command(override: str):
        return lambda where: (
            "orchestrator.train",
            [f"hydra.run.dir={where / 'hydra'}", override],
            dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{where / 'cli.db'}"),
        )

    overrides = [*BAD_VALUES, "learner.zero_stag=3"]
    return run_cli_batch(tmp_path_factory.mktemp("cli"), {o: command(o) for o in overrides})


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_cli_bad_value_fails_with_one_line(cli_refusals, override):
    proc, where = cli_refusals[override]
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {BAD_VALUES[override]}:"), proc.stderr
    assert not (where / "cli.db").exists(), "nothing is written before the config is valid"


def test_cli_unknown_key_is_rejected(cli_refusals):
    proc, _ = cli_refusals["learner.zero_stag=3"]
    assert proc.returncode != 0
    assert "zero_stag" in proc.stderr


def test_required_value_left_unset_is_named(tmp_path):
    from orchestrator.config import ConfigError, validate

    cfg = compose_cfg(["model=hf", f"model.path={tmp_path}", "data=files"])
    with pytest.raises(ConfigError, match=r"^data.train_files: a value is required"):
        validate(cfg)


def test_the_default_schedule_is_sfpo_lookahead_and_rl_extra_the_papers_auto():
    """conf/schedule/lookahead.yaml is the job's default: the strategy, SFPO's settings, its fixed α and entropy switch
    (the bench row `lookahead-k3` measured); `schedule=rl_extra` is back to the ScheduleConfig defaults."""
    from orchestrator.config import ScheduleConfig, validate

    default = validate(compose_cfg([])).schedule
    assert (default.name, default.strategy, default.m, default.beta_mode) == ("rl_extra", "lookahead", 1, "fixed")
    assert (default.lookahead_steps, default.lookahead_alpha, default.entropy_z) == (3, 0.8, 1.0)
    assert not default.needs_validation and default.schedule_beta == 0.8
    paper = validate(compose_cfg(["schedule=rl_extra"])).schedule
    assert paper == ScheduleConfig()
    assert (paper.strategy, paper.beta_mode, paper.m, paper.n) == ("extrapolate", "auto", 10, 30)


def test_lookahead_does_not_take_a_batch_in_flight():
    from orchestrator.config import ConfigError, validate

    validate(compose_cfg(["trainer.off_policy_steps=0"]))  # the default schedule is lookahead
    validate(compose_cfg(["schedule=rl_extra", "trainer.off_policy_steps=1"]))
    validate(compose_cfg(["schedule=rl", "trainer.off_policy_steps=1"]))
    with pytest.raises(ConfigError, match=r"^trainer.off_policy_steps: expected 0 with schedule.strategy=lookahead"):
        validate(compose_cfg(["trainer.off_policy_steps=1"]))


def test_updates_per_batch_is_for_plain_rl_and_the_projecting_strategies():
    from orchestrator.config import ConfigError, validate

    assert validate(compose_cfg([])).trainer.updates_per_batch == 1
    validate(compose_cfg(["schedule=rl", "trainer.updates_per_batch=4"]))
    validate(compose_cfg(["schedule=rl_extra", "trainer.updates_per_batch=2"]))
    with pytest.raises(ConfigError, match=r"^trainer.updates_per_batch: expected 1 with schedule.strategy=lookahead"):
        validate(compose_cfg(["trainer.updates_per_batch=2"]))
    with pytest.raises(ConfigError, match=r"^trainer.updates_per_batch: expected an integer >= 1, got 0"):
        validate(compose_cfg(["schedule=rl", "trainer.updates_per_batch=0"]))


def test_min_tokens_above_max_tokens_is_refused():
    from orchestrator.config import ConfigError, validate

    validate(compose_cfg(["rollout.max_tokens=8", "rollout.min_tokens=8"]))
    with pytest.raises(ConfigError, match=r"^rollout.min_tokens: expected at most rollout.max_tokens \(8\), got 9$"):
        validate(compose_cfg(["rollout.max_tokens=8", "rollout.min_tokens=9"]))


def test_a_token_budget_below_what_an_engine_step_needs_is_refused():
    """vLLM's own check (a token per sequence) and the CPU engine's (a whole prompt per step), as one line each
    before anything starts instead of a traceback from inside the rollout actor."""
    from orchestrator.config import ConfigError, validate

    validate(compose_cfg(["rollout.max_num_seqs=64", "rollout.max_num_batched_tokens=64"]))
    with pytest.raises(
        ConfigError,
        match=r"^rollout.max_num_batched_tokens: expected at least rollout.max_num_seqs \(256, a token for each "
        r"sequence of an engine step\), got 128$",
    ):
        validate(compose_cfg(["rollout.max_num_batched_tokens=128"]))
    with pytest.raises(
        ConfigError, match=r"^rollout.max_num_batched_tokens: expected at least rollout.max_model_len \(64\) on CPU"
    ):
        validate(compose_cfg(["rollout.max_num_seqs=32", "rollout.max_num_batched_tokens=32"]))
    validate(compose_cfg(["rollout.num_gpus=1", "rollout.max_num_seqs=32", "rollout.max_num_batched_tokens=32"]))


def test_missing_data_file_names_the_file(tmp_path):
    from orchestrator.config import InputError
    from orchestrator.data import load_splits

    cfg = compose_cfg(
        [
            "model=hf",
            f"model.path={tmp_path}",
            "data=files",
            f"data.train_files={tmp_path / 'nope.jsonl'}",
            f"data.eval_files={tmp_path / 'nope.jsonl'}",
        ]
    )
    with pytest.raises(InputError, match=r"nope.jsonl: expected a data file, directory or glob \(data.train_files\)"):
        load_splits(cfg, encode=None)


def test_real_dataset_fields_are_mapped(tmp_path):
    """jsonl and parquet files with other field names load into prompt/answer `datasets.Dataset`s."""
    import datasets

    from orchestrator.config import InputError
    from orchestrator.data import load_splits

    rows = [{"question": f"What is {i}+{i}?", "solution": str(2 * i)} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "eval.parquet"))
    base = [
        "model=hf",
        f"model.path={tmp_path}",
        "data=files",
        f"data.train_files={tmp_path / 'train.jsonl'}",
        f"data.eval_files={tmp_path / 'eval.parquet'}",
        "data.prompt_template='{prompt} Answer:'",
    ]
    mapped = ["data.prompt_field=question", "data.answer_field=solution"]
    splits = load_splits(compose_cfg(base + mapped), encode=None)
    assert splits.train[2] == {"prompt": "What is 2+2? Answer:", "answer": "4"}
    assert len(splits.eval) == 5 and splits.eval.column_names == ["prompt", "answer"]
    with pytest.raises(InputError, match=r"train.jsonl:1: expected a field 'problem' \(data.prompt_field\)"):
        load_splits(compose_cfg(base + ["data.prompt_field=problem", "data.answer_field=solution"]), encode=None)
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps({"problem": r["question"], "answer": r["solution"]}) for r in rows)
    )
    with pytest.raises(InputError, match=r"eval.parquet: expected the columns 'problem' and 'answer'"):
        load_splits(compose_cfg(base + ["data.prompt_field=problem"]), encode=None)
