"""`python -m orchestrator.evaluate`: config errors (one line naming the field, exit 2, nothing written), and one
end-to-end CLI run — three checkpoints through one vLLM engine (started once, then reloaded in place) plus logits
extrapolation — read back from the JSON and from the MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.evaluate import resolve_datasets, rewrite_argv, validate_eval
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- config, CLI


def test_literal_flag_maps_to_hydra_override():
    assert rewrite_argv(["x.py", "--logits-extrapolation", "eval.k=4"]) == [
        "x.py",
        "eval.logits_extrapolation.enabled=true",
        "eval.k=4",
    ]


def test_datasets_from_group_names_and_dicts():
    cfg = compose_cfg(
        ["eval.datasets=[toy_mul,{group:toy_add,name:add1,toy:{digits:1,num_eval:40}},{toy:{num_eval:7}},toy_code]"],
        "evaluate",
    )
    specs = resolve_datasets(cfg)
    assert [s.name for s in specs] == ["toy_mul", "add1", "toy_add2", "toy_code"]
    assert specs[0].data.toy.op == "mul" and specs[1].data.toy.digits == 1
    assert specs[2].data.toy.num_eval == 7 and specs[2].data.toy.op == "add"  # a dict without group edits `data`
    assert specs[3].data.verifier == "code"  # a global group (toy_code) contributes its data section


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.checkpoints=[/nonexistent/ckpt]"],
            r"^eval.checkpoints\[0\]: expected a checkpoint directory with config.json",
        ),
        (["eval.k=0"], r"^eval.k: expected an integer >= 1, got 0"),
        (["eval.top_p=1.5"], r"^eval.top_p: expected a number > 0 and <= 1"),
        (["eval.datasets=[nope]"], r"^eval.datasets\[0\]: expected a data group name"),
        (["eval.datasets=[{toy:{digitz:1}}]"], r"^eval.datasets\[0\]: .*digitz"),
        (["eval.datasets=[{toy:{digits:9}}]"], r"^eval.datasets\[0\].toy.digits: expected an integer in \[1, 6\]"),
        (
            ["eval.max_tokens=40"],
            r"^data.max_prompt_tokens: expected max_prompt_tokens \+ max tokens \(32 \+ 40\) <= rollout.max_model_len",
        ),
        (["eval.logits_extrapolation.enabled=true"], r"^eval.logits_extrapolation.t0_path: expected a checkpoint path"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_eval(compose_cfg(overrides, "evaluate"))


def test_alpha_and_steps_are_exclusive(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    lx = [
        "eval.logits_extrapolation.enabled=true",
        f"eval.logits_extrapolation.t0_path={tmp_path}",
        f"eval.logits_extrapolation.t1_path={tmp_path}",
    ]
    with pytest.raises(ConfigError, match=r"^eval.logits_extrapolation.alpha: expected exactly one of alpha or steps"):
        validate_eval(compose_cfg(lx, "evaluate"))
    with pytest.raises(ConfigError, match=r"^eval.logits_extrapolation.steps: expected three numbers"):
        validate_eval(compose_cfg(lx + ["eval.logits_extrapolation.steps=[5,5,10]"], "evaluate"))
    validate_eval(compose_cfg(lx + ["eval.logits_extrapolation.alpha=2.0"], "evaluate"))


def _run_cli(args: list[str], tmp_path, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.evaluate", f"hydra.run.dir={tmp_path / 'hydra'}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_missing_checkpoint_is_one_line_exit_2(tmp_path):
    proc = _run_cli([f"eval.checkpoints=[{tmp_path / 'missing'}]"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: eval.checkpoints[0]:") and "missing" in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists(), "nothing is written before the config is valid"


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen2 with the toy tokenizer: same architecture as the toy model, scores 0."""
    from orchestrator.config import TinyModelConfig
    from orchestrator.toy_task import build_tiny_model, build_tokenizer

    path = tmp_path_factory.mktemp("random-ckpt")
    tok = build_tokenizer()
    build_tiny_model(
        TinyModelConfig(), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed=5
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_cli_checkpoints_and_logits_extrapolation_end_to_end(toy_model_path, random_ckpt, cache_dir, tmp_path):
    """Checkpoints [toy, random, toy] on two datasets through one vLLM engine (the second and third are
    streamed into it), plus logits extrapolation between random (t0) and toy (t1) at α = 1.5."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "eval.json"
    proc = _run_cli(
        [
            f"model.cache_dir={cache_dir}",
            "data.toy.digits=1",
            "data.toy.num_train=2000",
            "data.toy.num_eval=40",
            f"eval.checkpoints=[{toy_model_path},{random_ckpt},{toy_model_path}]",
            "eval.datasets=[{name:add1},{group:toy_mul,name:mul1,toy:{digits:1,num_train:2000,num_eval:40}}]",
            "eval.k=4",
            "eval.max_prompts=8",
            "eval.save_samples=true",
            f"eval.output={out}",
            "rollout.kv_cache_mb=16",
            "--logits-extrapolation",
            f"eval.logits_extrapolation.t0_path={random_ckpt}",
            f"eval.logits_extrapolation.t1_path={toy_model_path}",
            "eval.logits_extrapolation.steps=[0,100,150]",
        ],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [load["how"] for load in summary["engine_loads"]] == ["start", "reload", "reload"]
    rows = {(r["target"], r["step"], r["dataset"]): r for r in summary["results"]}
    assert len(rows) == 3 * 2 + 2
    for r in summary["results"]:
        assert r["k"] == 4 and r["num_prompts"] == 8
        assert 0.0 <= r["avg_at_k"] <= 1.0 and 0.0 <= r["pass_at_k"] <= 1.0
        assert r["pass_at_k"] >= r["pass_at"]["1"] - 1e-12 and r["pass_at"]["1"] <= r["avg_at_k"] + 1e-12
        assert set(r["pass_at"]) == {"1", "2", "4"}
    assert rows[(toy_model_path, 0, "add1")]["avg_at_k"] > rows[(random_ckpt, 1, "add1")]["avg_at_k"]
    for ds in ("add1", "mul1"):
        first, again = rows[(toy_model_path, 0, ds)], rows[(toy_model_path, 2, ds)]
        # same seed, same weights: the engine reloaded back to the toy model samples exactly what it did at start
        assert (again["avg_at_k"], again["pass_at"]) == (first["avg_at_k"], first["pass_at"])
        lx = rows[("logits-extrapolation(alpha=1.5)", 150, ds)]
        assert lx["kind"] == "logits_extrapolation" and lx["extra"]["alpha"] == 1.5
    samples = sorted((tmp_path / "samples").glob("*.jsonl"))
    assert len(samples) == 8
    texts = [[json.loads(line)["response"] for line in p.read_text().splitlines()] for p in samples]
    assert texts[0] == texts[4] and texts[0] != texts[2]  # toy (start) == toy (reloaded) != random, dataset add1

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["rlextra.kind"] == "eval"
    assert run.data.params["eval.k"] == "4" and run.data.params["eval.temperature"] == "0.6"
    for ds in ("add1", "mul1"):
        hist = client.get_metric_history(run.info.run_id, f"eval/{ds}/avg_at_k")
        assert sorted((m.step, m.value) for m in hist) == [
            (s, rows[(t, s, ds)]["avg_at_k"]) for s, t in enumerate([toy_model_path, random_ckpt, toy_model_path])
        ]
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"eval/{ds}/pass_at_2")] == [0, 1, 2]
        lx_hist = client.get_metric_history(run.info.run_id, f"logits_extra/{ds}/pass_at_k")
        assert [(m.step, m.value) for m in lx_hist] == [
            (150, rows[("logits-extrapolation(alpha=1.5)", 150, ds)]["pass_at_k"])
        ]
    assert "eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
