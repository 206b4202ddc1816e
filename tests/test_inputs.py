"""Bad inputs through the real entry points (`python -m orchestrator.train / evaluate / extrapolate / analyze`, every
case run as that command in one subprocess, tests/cli_batch.py): every one ends with exit code 2 and exactly one
`error: ...` line on stderr naming the file (and line) and what was expected, no traceback, and nothing written or
started — no output folder, no MLflow store, no Ray session (Ray's temporary folder is pointed at a path that must
stay absent). Then the two paths where a bad input
does not end the job, each a real short job: `data.skip_bad_rows=true` trains on the good rows and logs the count,
and `trainer.resume=auto` skips a torn newest checkpoint for the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli_batch, tiny_job_overrides

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "train": "orchestrator.train",
    "evaluate": "orchestrator.evaluate",
    "extrapolate": "orchestrator.extrapolate",
    "analyze": "orchestrator.analyze",
}


def _env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_TMPDIR=str(tmp_path / "ray"))
    env.pop("RAY_ADDRESS", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, **extra}


def _case(tool: str, args: list, where: Path, **env) -> tuple[str, list, dict]:
    """`python -m <tool's module> args` with its own folder `where` for everything it might write or start."""
    hydra = [f"hydra.run.dir={where / 'hydra'}"] if tool in ("train", "evaluate") else []
    return MODULES[tool], [*hydra, *map(str, args)], _env(where, **env)


def _assert_one_line_and_nothing_started(proc: subprocess.CompletedProcess, expected: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"error: {expected}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    for written in ("out", "mlflow.db", "ray"):
        assert not (tmp_path / written).exists(), f"{written} was written or started on a bad input"


# -------------------------------------------------------------------------------------------------- inputs


def _rows(n: int, start: int = 0) -> list[dict]:
    """Toy-task rows the tiny model's tokenizer reads: `a+b=` and the sum."""
    return [{"prompt": f"{i % 10}+{(i * 7) % 10}=", "answer": str(i % 10 + (i * 7) % 10)} for i in range(start, n)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def inputs(toy_model_path, tmp_path_factory) -> dict[str, Path]:
    """Good data, and one broken copy of each kind of input."""
    import datasets
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("inputs")
    model = Path(toy_model_path)
    p = {"model": model, "good": _jsonl(d / "good.jsonl", _rows(40))}
    rows = _rows(12)
    rows[2] = '{"prompt": "1+2=", "answer": '  # line 3
    rows[5] = {"prompt": "1+2=", "answer": None}
    rows[9] = {"prompt": "1+2=", "answer": "three"}
    p["mixed"] = _jsonl(d / "mixed.jsonl", rows)
    p["null"] = _jsonl(d / "null.jsonl", _rows(4) + [{"prompt": "3+4=", "answer": None}])
    p["no_prompt"] = _jsonl(d / "no_prompt.jsonl", [{"question": "1+1=", "answer": "2"}])
    p["int_prompt"] = _jsonl(d / "int_prompt.jsonl", _rows(3) + [{"prompt": 5, "answer": "5"}])
    p["too_long"] = _jsonl(d / "too_long.jsonl", _rows(2) + [{"prompt": "1+2=" * 10, "answer": "3"}])
    p["unverifiable"] = _jsonl(d / "unverifiable.jsonl", _rows(2) + [{"prompt": "1+2=", "answer": "3.0"}])
    (d / "empty.jsonl").write_text("")
    p["empty"] = d / "empty.jsonl"
    (d / "no_data").mkdir()
    (d / "no_data" / "notes.txt").write_text("not data")
    p["no_data"] = d / "no_data"
    datasets.Dataset.from_list([{"question": "1+1=", "solution": "2"}]).to_parquet(str(d / "columns.parquet"))
    p["parquet"] = d / "columns.parquet"
    (d / "columns.csv").write_text("question,answer\n1+1=,2\n")
    p["csv"] = d / "columns.csv"

    def broken(name: str, brake) -> None:
        p[name] = d / name
        shutil.copytree(model, p[name])
        brake(p[name])

    broken("no_config", lambda m: (m / "config.json").unlink())
    broken("bad_config", lambda m: (m / "config.json").write_text('{"model_type": "qwen2", '))
    broken("unknown_type", lambda m: (m / "config.json").write_text(json.dumps({"model_type": "qwen99"})))
    broken("no_tokenizer", lambda m: [f.unlink() for f in m.glob("tokenizer*")])
    broken("no_weights", lambda m: (m / "model.safetensors").unlink())
    broken("truncated", lambda m: os.truncate(m / "model.safetensors", (m / "model.safetensors").stat().st_size // 2))
    p["torn_job_ckpt"] = d / "run" / "checkpoints" / "rl_step_5"  # a job's checkpoint whose state file lost keys
    shutil.copytree(model, p["torn_job_ckpt"] / "hf")
    (p["torn_job_ckpt"] / "rlextra_state.json").write_text('{"rl_step": 5}')
    probes = d / "probes.txt"
    probes.write_text("1+1=\n2+2=\n")
    p["probes"] = probes
    save_file({"w": __import__("torch").zeros(4)}, str(d / "w.safetensors"))
    return p


def _files(train: Path, evals: Path | None = None) -> list[str]:
    return [f"data.train_files={train}", f"data.eval_files={evals or train}"]


TRAIN_CASES = {
    # data rows
    "unparsable row, first of several": (
        lambda p: _files(p["mixed"], p["good"]),
        "{mixed}:3: expected a JSON object, found unparsable JSON (Expecting value) "
        "(the first of 3 bad rows of 12 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "null answer": (
        lambda p: _files(p["null"], p["good"]),
        "{null}:5: expected a value for 'answer', found null "
        "(the first of 1 bad rows of 5 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "missing prompt field": (
        lambda p: _files(p["no_prompt"], p["good"]),
        "{no_prompt}:1: expected a field 'prompt' (data.prompt_field), found fields 'question', 'answer' "
        "(the first of 1 bad rows of 1 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "prompt of the wrong type": (
        lambda p: _files(p["int_prompt"], p["good"]),
        "{int_prompt}:4: expected a string 'prompt', found int 5 "
        "(the first of 1 bad rows of 4 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "prompt too long": (
        lambda p: _files(p["too_long"], p["good"]),
        "{too_long}:3: expected a prompt of at most 32 tokens (data.max_prompt_tokens), found 41 "
        "(the first of 1 bad rows of 3 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "reference the verifier cannot match": (
        lambda p: _files(p["unverifiable"], p["good"]),
        "{unverifiable}:3: expected a non-negative integer answer (digits only) for the arith verifier, found '3.0' "
        "(the first of 1 bad rows of 3 in data.train_files; data.skip_bad_rows=true skips them)",
    ),
    "bad eval split": (
        lambda p: _files(p["good"], p["null"]),
        "{null}:5: expected a value for 'answer', found null "
        "(the first of 1 bad rows of 5 in data.eval_files; data.skip_bad_rows=true skips them)",
    ),
    # data files
    "empty file": (lambda p: _files(p["empty"], p["good"]), "{empty}: expected at least one row, found an empty file"),
    "glob matching nothing": (
        lambda p: _files(p["good"].parent / "*.arrow", p["good"]),
        "data.train_files: expected files matching '{good.parent}/*.arrow', found none",
    ),
    "directory without data files": (
        lambda p: _files(p["no_data"], p["good"]),
        "{no_data}: expected .jsonl, .json, .parquet or .csv files (data.train_files), found none",
    ),
    "missing file": (
        lambda p: _files(p["good"].parent / "nope.jsonl", p["good"]),
        "{good.parent}/nope.jsonl: expected a data file, directory or glob (data.train_files), found no such path",
    ),
    "parquet without the fields": (
        lambda p: _files(p["parquet"], p["good"]),
        "{parquet}: expected the columns 'prompt' and 'answer' (data.prompt_field, data.answer_field), "
        "found 'question', 'solution'",
    ),
    "csv without the fields": (
        lambda p: _files(p["csv"], p["good"]),
        "{csv}: expected the columns 'prompt' and 'answer' (data.prompt_field, data.answer_field), "
        "found 'question', 'answer'",
    ),
    # the model folder
    "model without config.json": (
        lambda p: [f"model.path={p['no_config']}"],
        "{no_config}: expected a config.json (a save_pretrained folder), found none",
    ),
    "corrupt config.json": (
        lambda p: [f"model.path={p['bad_config']}"],
        "{bad_config}/config.json: expected JSON, found unparsable text",
    ),
    "unknown model_type": (
        lambda p: [f"model.path={p['unknown_type']}"],
        "{unknown_type}/config.json: expected a model_type transformers and vLLM know, found 'qwen99'",
    ),
    "missing tokenizer": (
        lambda p: [f"model.path={p['no_tokenizer']}"],
        "{no_tokenizer}: expected a tokenizer (tokenizer.json, tokenizer.model, vocab.json, vocab.txt, "
        "spiece.model, tokenizer.tiktoken), found none",
    ),
    "missing weights": (
        lambda p: [f"model.path={p['no_weights']}"],
        "{no_weights}: expected model.safetensors or model.safetensors.index.json (safetensors), "
        "found 0 .safetensors files",
    ),
    "truncated weights": (
        lambda p: [f"model.path={p['truncated']}"],
        "{truncated}/model.safetensors: expected every tensor inside the file, "
        "found tensor 'model.layers.0.self_attn.v_proj.weight' past its end (truncated or corrupt)",
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input_is_one_line_and_starts_nothing(inputs, refusals, case):
    proc, where = refusals[f"train: {case}"]
    _assert_one_line_and_nothing_started(proc, TRAIN_CASES[case][1].format(**inputs), where)


def test_train_bad_input_with_hydra_full_error_shows_the_traceback(inputs, refusals):
    proc, _ = refusals["train with HYDRA_FULL_ERROR"]
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "orchestrator.config.InputError: " in proc.stderr and f"{inputs['null']}:5" in proc.stderr


EVALUATE_CASES = {
    "truncated checkpoint": (
        lambda p: [f"eval.checkpoints=[{p['truncated']}]"],
        "{truncated}/model.safetensors: expected every tensor inside the file, "
        "found tensor 'model.layers.0.self_attn.v_proj.weight' past its end (truncated or corrupt)",
    ),
    "torn training checkpoint": (
        lambda p: [f"eval.checkpoints=[{p['model']},{p['torn_job_ckpt']}/hf]"],
        "{torn_job_ckpt}/rlextra_state.json: expected the keys rl_step, data_position, weight_version, "
        "mlflow_run_id, eval_before, python_rng, found none of data_position, weight_version, mlflow_run_id, "
        "eval_before, python_rng",
    ),
    "bad dataset row": (
        lambda p: [
            f"eval.checkpoints=[{p['model']}]",
            f"eval.datasets=[{{name:mine,source:files,train_files:{p['null']},eval_files:{p['null']}}}]",
        ],
        "{null}:5: expected a value for 'answer', found null "
        "(the first of 1 bad rows of 5 in eval.datasets[0].eval_files; data.skip_bad_rows=true skips them)",
    ),
    "logits extrapolation's t1 without a tokenizer": (
        lambda p: [
            "eval.logits_extrapolation.enabled=true",
            f"eval.logits_extrapolation.t0_path={p['model']}",
            f"eval.logits_extrapolation.t1_path={p['no_tokenizer']}",
            "eval.logits_extrapolation.alpha=2",
        ],
        "{no_tokenizer}: expected a tokenizer (tokenizer.json, tokenizer.model, vocab.json, vocab.txt, "
        "spiece.model, tokenizer.tiktoken), found none",
    ),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_bad_input_is_one_line_and_starts_nothing(inputs, refusals, case):
    proc, where = refusals[f"evaluate: {case}"]
    _assert_one_line_and_nothing_started(proc, EVALUATE_CASES[case][1].format(**inputs), where)


def test_extrapolate_bad_t1_config_is_one_line(inputs, refusals):
    proc, where = refusals["extrapolate"]
    expected = f"--t1-path {inputs['bad_config']}/config.json: expected JSON, found unparsable text"
    _assert_one_line_and_nothing_started(proc, expected, where)
    proc, _ = refusals["extrapolate with HYDRA_FULL_ERROR"]
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ExtrapolationError: --t1-path" in proc.stderr


def test_analyze_bad_model_for_the_probes_is_one_line(inputs, refusals):
    """The probes load every checkpoint as a model: a corrupt config.json fails before the weights are read."""
    proc, where = refusals["analyze"]
    _assert_one_line_and_nothing_started(
        proc, f"{inputs['bad_config']}/config.json: expected JSON, found unparsable text", where
    )


@pytest.fixture(scope="module")
def refusals(inputs, cache_dir, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad-input command above, each with a folder of its own, run in one subprocess (tests/cli_batch.py):
    case → (its CompletedProcess, its folder)."""
    cases = {}

    def add(name: str, tool: str, args: list, **env) -> None:
        """A case whose args may name its folder: an arg that is a function of it."""
        cases[name] = lambda where: _case(tool, [a(where) if callable(a) else a for a in args], where, **env)

    model = ["model.source=path", f"model.path={inputs['model']}", "data.source=files"]
    out = lambda where: f"trainer.output_dir={where / 'out'}"  # noqa: E731
    eval_out = lambda where: f"eval.output={where / 'out' / 'eval.json'}"  # noqa: E731
    out_dir = lambda where: where / "out"  # noqa: E731
    for case, (overrides, _) in TRAIN_CASES.items():
        add(f"train: {case}", "train", [*model, *_files(inputs["good"]), out, *overrides(inputs)])
    add("train with HYDRA_FULL_ERROR", "train", [*model, *_files(inputs["null"]), out], HYDRA_FULL_ERROR="1")
    for case, (overrides, _) in EVALUATE_CASES.items():
        add(f"evaluate: {case}", "evaluate", [f"model.cache_dir={cache_dir}", eval_out, *overrides(inputs)])
    t1 = ["--t0-path", inputs["model"], "--t1-path", inputs["bad_config"], "--beta", 2, "--out", out_dir]
    add("extrapolate", "extrapolate", t1)
    add("extrapolate with HYDRA_FULL_ERROR", "extrapolate", t1, HYDRA_FULL_ERROR="1")
    ckpts = [inputs["model"], inputs["bad_config"], inputs["model"]]
    probes = ["--probes", inputs["probes"], "--no-mlflow", "--out", out_dir]
    add("analyze", "analyze", ["--checkpoints", *ckpts, "--steps", 0, 1, 2, *probes])
    return run_cli_batch(tmp_path_factory.mktemp("refusals"), cases)


# ---------------------------------------------------------------------------------------------- real jobs


def _job_command(inputs, cache_dir, out: Path, db: Path) -> list[str]:
    overrides = [o for o in tiny_job_overrides(cache_dir, out, steps=3) if not o.startswith("tracking.tracking_uri")]
    return [
        *overrides,
        f"tracking.tracking_uri=sqlite:///{db}",
        f"hydra.run.dir={out}/hydra",
        "model.source=path",
        f"model.path={inputs['model']}",
        "data.source=files",
        f"data.train_files={inputs['mixed']}",
        f"data.eval_files={inputs['good']}",
        "data.skip_bad_rows=true",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=0",
        "cluster.num_cpus=4",
    ]


def _job(args: list[str], log: Path) -> str:
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.train", *args],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def skipping_job(inputs, cache_dir, tmp_path_factory) -> dict:
    """A 3-step job on train data with 3 bad rows of 12 and data.skip_bad_rows=true, a checkpoint every step."""
    root = tmp_path_factory.mktemp("skip-job")
    out, db = root / "out", root / "mlflow.db"
    args = _job_command(inputs, cache_dir, out, db)
    log = _job(args, root / "first.log")
    return {"args": args, "log": log, "out": out, "db": db, "root": root}


@pytest.mark.slow
def test_skip_bad_rows_trains_on_the_good_rows_and_logs_the_count(inputs, skipping_job):
    from mlflow.tracking import MlflowClient

    line = (
        "[rlextra] data.train_files: skipped 3 bad rows of 12 (data.skip_bad_rows; the first: "
        f"{inputs['mixed']}:3: expected a JSON object, found unparsable JSON (Expecting value))"
    )
    assert line in skipping_job["log"].splitlines()
    assert "9 train / 8 eval prompts" in skipping_job["log"]
    summary = json.loads((skipping_job["out"] / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{skipping_job['db']}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.skip_bad_rows"] == "True"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "data/skipped_rows_train")] == [
        (0, 3.0)
    ]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "data/skipped_rows_eval")] == [0.0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2, 3]


@pytest.mark.slow
def test_resume_skips_a_torn_newest_checkpoint_for_the_previous_one(skipping_job):
    from mlflow.tracking import MlflowClient

    ckpts = skipping_job["out"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("rl_step_")) == ["rl_step_1", "rl_step_2"]
    weights = ckpts / "rl_step_2" / "hf" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # the newest checkpoint, marker present, weights torn
    log = _job(skipping_job["args"], skipping_job["root"] / "second.log")  # the same command again

    torn = [line for line in log.splitlines() if "checkpoint rl_step_2 is torn" in line]
    assert len(torn) == 1 and f"{weights}: expected every tensor inside the file" in torn[0], log[-3000:]
    assert f"resumed from {ckpts / 'rl_step_1'} (rl_step 1" in log
    summary = json.loads((skipping_job["out"] / "summary.json").read_text())
    assert summary["resumed_from_step"] == 1 and summary["rl_steps"] == 3
    aside = [p.name for p in ckpts.iterdir() if p.name.startswith("rl_step_2.torn-")]
    assert len(aside) == 1 and (ckpts / "rl_step_2" / "rlextra_state.json").is_file(), "step 2 saved again, whole"

    client = MlflowClient(tracking_uri=f"sqlite:///{skipping_job['db']}")
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "rl_step")] == [1, 2, 3], "each step logged once"
    note = client.download_artifacts(run_id, f"torn_checkpoints/{aside[0]}.txt", str(skipping_job["root"]))
    assert Path(note).read_text().strip() == torn[0].removeprefix("[rlextra] ")
