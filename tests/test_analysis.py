"""Linearity analysis: R² math against scipy/numpy, sampling and filtering rules, streaming memory, the CLI's
errors, the full analysis on synthetic HF checkpoints with known linearity, and one end-to-end run on the
checkpoints of a real short training job (slow)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from linearity.analysis import (
    AnalysisConfig,
    AnalysisError,
    SeriesAccumulator,
    parse_param_name,
    sample_count,
    sample_indices,
    token_groups,
)
from orchestrator.analyze import Checkpoint, analyze_weights, read_elements, read_entries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _feed(series: np.ndarray, steps: np.ndarray, order=None) -> SeriesAccumulator:
    acc = SeriesAccumulator(series.shape[0], track=series.shape[0])
    for j in order if order is not None else range(len(steps)):
        acc.update(series[:, j], steps[j])
    return acc


def _write_ckpt(path: Path, tensors: dict) -> None:
    """A bare safetensors checkpoint directory (torch tensors, any float dtype)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ R² math


def test_streamed_r2_slope_intercept_match_scipy_and_trend_r2_score():
    """Uneven steps fed out of order; every statistic equals scipy's linregress and linearity.trend.r2_score."""
    import torch
    from scipy import stats

    from linearity.trend import r2_score

    rng = np.random.default_rng(0)
    steps = np.array([0.0, 3, 5, 10, 11, 20, 31, 40])
    w0 = rng.normal(0, 0.02, 300)
    v = rng.normal(0, 1e-4, 300)
    series = w0[:, None] + v[:, None] * steps + rng.normal(0, 2e-4, (300, steps.size)) * rng.uniform(0, 1, (300, 1))
    acc = _feed(series, steps, order=[3, 0, 7, 1, 5, 2, 6, 4])
    ref = [stats.linregress(steps, y) for y in series]
    np.testing.assert_allclose(acc.r2(), [r.rvalue**2 for r in ref], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(acc.slope(), [r.slope for r in ref], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(acc.intercept(), [r.intercept for r in ref], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.r2(), r2_score(torch.from_numpy(series), torch.from_numpy(steps)).numpy(), rtol=1e-9)
    resid = series - np.array([np.polyval(np.polyfit(steps, y, 1), steps) for y in series])
    ss_tot = ((series - series.mean(1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(acc.r2(), 1 - (resid**2).sum(1) / ss_tot, rtol=1e-7)
    t_sorted, values = acc.trajectories()
    np.testing.assert_array_equal(t_sorted, steps)
    np.testing.assert_array_equal(values, series[acc.tracked])


def test_pure_line_is_one_noise_is_near_zero_constant_is_dropped():
    rng = np.random.default_rng(1)
    T = 40
    steps = np.arange(T, dtype=float) * 5
    line = 0.05 + 3e-5 * steps  # a weight of size 5e-2 moving 6e-3: centring keeps this exact
    noise = rng.normal(0, 1e-3, (4000, T))
    const = np.full(T, 0.0123)
    series = np.vstack([np.tile(line, (10, 1)), noise, const])
    acc = _feed(series, steps)
    r2 = acc.r2()
    np.testing.assert_allclose(r2[:10], 1.0, atol=1e-10)
    # independent noise: R² ~ Beta(1/2, (T-2)/2), mean 1/(T-1)
    assert abs(r2[10:-1].mean() - 1 / (T - 1)) < 0.004
    assert np.isnan(r2[-1])
    keep, dropped = acc.keep_mask(1e-4, 4)
    assert keep[:-1].all() and not keep[-1]
    assert dropped == {"small_change": 1, "few_distinct": 0}


def test_filter_rules_small_change_and_few_distinct_values():
    """The paper's code: keep an element iff its range > 1e-4 and it takes at least 4 distinct values."""
    steps = np.arange(8, dtype=float)
    rows = {
        "moves": 0.1 + 1e-3 * steps,  # kept
        "tiny": 0.1 + 1e-5 * steps,  # range 7e-5 < 1e-4: small change
        "three_values": np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3]),  # bf16-like plateaus: few distinct
        "four_values": np.array([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4]),  # kept
        "tiny_and_few": np.array([0.1] * 7 + [0.10005]),  # fails both: counted once, as small change
    }
    acc = _feed(np.vstack(list(rows.values())), steps)
    keep, dropped = acc.keep_mask(1e-4, 4)
    assert dict(zip(rows, keep.tolist())) == {
        "moves": True,
        "tiny": False,
        "three_values": False,
        "four_values": True,
        "tiny_and_few": False,
    }
    assert dropped == {"small_change": 2, "few_distinct": 1}
    assert acc.n_distinct.tolist() == [4, 4, 3, 4, 2]  # the tracker saturates at 4


def test_duplicate_step_and_too_few_points_are_one_line_errors():
    acc = SeriesAccumulator(3)
    acc.update(np.zeros(3), 1)
    with pytest.raises(AnalysisError, match=r"^step 1 appears twice"):
        acc.update(np.ones(3), 1.0)
    with pytest.raises(AnalysisError, match="at least two distinct steps"):
        acc.r2()


def test_config_from_a_mapping_names_the_bad_field():
    assert AnalysisConfig.from_mapping(
        {"enabled": True, "weight_fraction": 0.01, "track": 8.0, "plots": False}
    ) == AnalysisConfig(weight_fraction=0.01, track=8, plots=False)
    with pytest.raises(AnalysisError, match=r"^analysis.weight_fractoin: unknown field"):
        AnalysisConfig.from_mapping({"weight_fractoin": 0.01})
    with pytest.raises(AnalysisError, match=r"^analysis.plots: expected bool, got 'false'"):
        AnalysisConfig.from_mapping({"plots": "false"})
    with pytest.raises(AnalysisError, match=r"^analysis.min_distinct: expected an integer >= 1, got 0"):
        AnalysisConfig.from_mapping({"min_distinct": 0})


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_indices_count_determinism_and_independence():
    assert [sample_count(n, 1e-3, 50) for n in (10, 1000, 50_000, 10**6)] == [10, 50, 50, 1000]
    a = sample_indices("model.layers.0.mlp.up_proj.weight", 10**6, 1e-3, 50, seed=0)
    assert a.dtype == np.int64 and a.size == 1000 and np.all(np.diff(a) > 0) and 0 <= a[0] and a[-1] < 10**6
    np.testing.assert_array_equal(a, sample_indices("model.layers.0.mlp.up_proj.weight", 10**6, 1e-3, 50, seed=0))
    assert not np.array_equal(a, sample_indices("model.layers.1.mlp.up_proj.weight", 10**6, 1e-3, 50, seed=0))
    assert not np.array_equal(a, sample_indices("model.layers.0.mlp.up_proj.weight", 10**6, 1e-3, 50, seed=1))
    np.testing.assert_array_equal(sample_indices("small", 30, 1e-3, 50, seed=0), np.arange(30))
    big = sample_indices("embed", 10**10, 1e-7, 50, seed=0)  # no permutation of the whole range
    assert big.size == 1000 and np.unique(big).size == 1000


def test_the_same_sampled_elements_are_read_from_every_checkpoint(tmp_path):
    """Element e of tensor k holds k·1e4 + e + t·0.5 at step t (exact in fp32; a bf16 tensor holds 2e + t):
    every tracked trajectory must be exactly its own index's line."""
    import torch

    shapes = {"a.weight": (64, 48), "b.bias": (300,), "c.weight": (16, 16, 4)}
    steps = [0, 2, 4, 6, 8]
    for t in steps:
        tensors = {}
        for k, (name, shape) in enumerate(shapes.items()):
            n = int(np.prod(shape))
            vals = torch.arange(n, dtype=torch.float64) + k * 1e4 + t * 0.5
            tensors[name] = vals.reshape(shape).to(torch.float32)
        tensors["d.weight"] = (torch.arange(64, dtype=torch.float32) * 2 + t).to(
            torch.bfloat16
        )  # integers ≤ 256: exact
        tensors["step_counter"] = torch.tensor([t], dtype=torch.int64)  # not float: skipped
        _write_ckpt(tmp_path / f"rl_step_{t}", tensors)
    cfg = AnalysisConfig(weight_fraction=0.05, weight_min_samples=20, track=10_000, min_abs_change=0.0)
    res = analyze_weights([Checkpoint(t, tmp_path / f"rl_step_{t}") for t in steps], cfg)
    assert res.skipped_tensors == ["step_counter"]
    by_name = {t["name"]: t for t in res.tensors}
    assert by_name["a.weight"]["sampled"] == sample_count(64 * 48, 0.05, 20) == 153
    assert by_name["d.weight"]["sampled"] == 20
    np.testing.assert_allclose(res.r2, 1.0, atol=1e-12)  # every element moves on an exact line
    assert len(res.examples) == 6
    for ex in res.examples:
        k = list(shapes).index(ex["label"]) if ex["label"] in shapes else None
        start = ex["index"] + k * 1e4 if k is not None else ex["index"] * 2
        slope = 0.5 if k is not None else 1
        np.testing.assert_array_equal(ex["values"], [start + slope * t for t in steps])
    entries = read_entries(tmp_path / "rl_step_8")
    idx = sample_indices("d.weight", 64, 0.0, 20, 0)
    np.testing.assert_array_equal(read_elements(entries["d.weight"], idx), idx * 2.0 + 8)


def test_parse_param_name():
    cases = {
        "model.layers.3.self_attn.q_proj.weight": (3, "q_proj"),
        "model.layers.3.self_attn.q_proj.bias": (3, "q_proj.bias"),
        "model.layers.12.mlp.down_proj.weight": (12, "down_proj"),
        "model.layers.0.input_layernorm.weight": (0, "input_layernorm"),
        "model.embed_tokens.weight": (None, "embed_tokens"),
        "model.norm.weight": (None, "norm"),
        "lm_head.weight": (None, "lm_head"),
        "transformer.h.5.attn.c_attn.weight": (5, "c_attn"),
        "module.model.layers.1.mlp.gate_proj.weight": (1, "gate_proj"),
    }
    assert {n: parse_param_name(n) for n in cases} == cases


def test_token_groups_rule():
    r2 = np.array([0.95, 0.2, np.nan, 0.99, 0.1])
    change = np.array([1.0, 0.5, 0.3, 0.05, 0.01])
    assert token_groups(r2, change, change_threshold=0.2, r2_threshold=0.7).tolist() == [0, 1, 1, 2, 2]


# --------------------------------------------------------------------------------------------- streaming


def _series_of_checkpoints(root: Path, count: int) -> list[Checkpoint]:
    import torch

    g = torch.Generator().manual_seed(0)
    w0 = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 512, generator=g) * 0.02 for i in range(2)}
    v = {k: torch.randn(w.shape, generator=g) * 3e-4 for k, w in w0.items()}
    out = []
    for t in range(count):
        _write_ckpt(root / f"rl_step_{t}", {k: w0[k] + t * v[k] for k in w0})
        out.append(Checkpoint(t, root / f"rl_step_{t}"))
    return out


def test_memory_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    """tracemalloc peak of the weight analysis (numpy allocations are traced) with 4 vs 16 checkpoints of a model
    whose tensors are 512 KiB each: the peak stays flat (not ~4×) and below the size of a single tensor."""
    cfg = AnalysisConfig(weight_fraction=0.01, track=16)
    peaks, state = {}, {}
    for count in (4, 16):
        ckpts = _series_of_checkpoints(tmp_path / str(count), count)
        tracemalloc.start()
        try:
            res = analyze_weights(ckpts, cfg)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        state[count] = res.state_bytes
        assert res.r2.size > 2000
    tensor_bytes = 256 * 512 * 4
    assert state[4] == state[16]
    assert peaks[16] < 1.25 * peaks[4], peaks
    assert peaks[16] < tensor_bytes, f"peak {peaks[16]} B: a whole tensor ({tensor_bytes} B) was materialised"


# ------------------------------------------------------------------------------------------ full analysis


def _synthetic_hf_series(root: Path, steps, noisy: str) -> list[Checkpoint]:
    """A tiny Qwen2 with the toy tokenizer: W_t = W0 + t·V for every tensor except ``noisy`` (fresh noise each
    step). Config and tokenizer are saved once; each step's weights are written with safetensors directly."""
    import shutil

    import torch

    from orchestrator.config import TinyModelConfig
    from orchestrator.toy_task import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    spec = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    model = build_tiny_model(spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed=0)
    meta = root / "meta"
    model.config.save_pretrained(meta)
    tok.save_pretrained(meta)
    g = torch.Generator().manual_seed(1)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    vel = {
        k: torch.randn(v.shape, generator=g).sign() * (1 + torch.rand(v.shape, generator=g)) * 1e-3
        for k, v in w0.items()
    }
    ckpts = []
    for t in steps:
        sd = {k: w0[k] + t * vel[k] for k in w0}
        sd[noisy] = w0[noisy] + torch.randn(w0[noisy].shape, generator=g) * 0.02
        d = root / f"rl_step_{t}" / "hf"
        shutil.copytree(meta, d)
        _write_ckpt(d, sd)
        ckpts.append(Checkpoint(t, d))
    return ckpts


def test_analyze_run_on_synthetic_checkpoints_writes_json_and_plots(tmp_path):
    from orchestrator.analyze import analyze_run

    noisy = "model.layers.1.mlp.up_proj.weight"
    ckpts = _synthetic_hf_series(tmp_path / "ck", [0, 10, 20, 30, 40], noisy)
    prompts = ["12+34=", "56+7=", "9+81=", "40+44=", "3+3="]
    cfg = {"weight_fraction": 0.02, "samples_per_probe": 2, "probe_max_tokens": 6, "activation_samples": 300}
    summary = analyze_run(
        [(c.step, str(c.path)) for c in reversed(ckpts)], tmp_path / "out", cfg, prompts=prompts, log=lambda *_: None
    )
    on_disk = json.loads((tmp_path / "out" / "linearity.json").read_text())
    assert on_disk["steps"] == [0, 10, 20, 30, 40] and on_disk["weights"]["r2"]["count"] > 500
    tensors = on_disk["weights"]["tensors"]
    for name, t in tensors.items():
        if name == noisy:
            assert t["r2_mean"] < 0.5, t
        else:
            assert t["kept"] == t["sampled"] and t["r2_mean"] > 0.999999, (name, t)
    assert set(on_disk["weights"]["per_layer_mean"]) == {"0", "1", "global"}
    assert on_disk["weights"]["per_module_mean"]["up_proj"] < on_disk["weights"]["per_module_mean"]["down_proj"]
    hm = on_disk["weights"]["heatmap"]
    assert hm["layers"] == ["0", "1", "global"] and hm["modules"][0] == "input_layernorm"
    lp = on_disk["logprobs"]
    probes = [json.loads(line) for line in (tmp_path / "out" / "probes.jsonl").read_text().splitlines()]
    assert lp["probes"] == len(probes) == 10 and lp["tokens"] == sum(len(p["response_ids"]) for p in probes)
    assert sum(g["count"] for g in lp["groups"].values()) == lp["tokens"]
    assert lp["r2_all"]["count"] == lp["tokens"]
    acts = on_disk["activations"]
    assert len(acts["per_layer_mean"]) == 3 and all(acts["layers"][str(i)]["sampled"] == 300 for i in range(3))
    for name in summary["plots"].values():
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    assert set(summary["plots"]) == {
        "overview",
        "weights_r2_hist",
        "weights_heatmap",
        "weight_trajectories",
        "logprob_r2_hist",
        "logprob_groups",
        "activations_r2",
    }

    # given responses are reused as they are: the same log-prob series again (JSON only this time)
    again = analyze_run(ckpts, tmp_path / "again", {**cfg, "plots": False}, prompts=probes, log=lambda *_: None)
    assert again["logprobs"]["r2_all"] == summary["logprobs"]["r2_all"] and again["plots"] == {}
    assert not list((tmp_path / "again").glob("*.png"))


def test_probe_prompts_come_from_a_hydra_run_dirs_eval_split(tmp_path):
    """`--run-dir` of a `python -m orchestrator.train` run: the probes default to its held-out eval prompts."""
    from omegaconf import OmegaConf

    from orchestrator.analyze import load_probe_file, prompts_from_run
    from tests.helpers import compose_cfg

    cfg = compose_cfg([f"model.cache_dir={tmp_path / 'cache'}", "data.toy.num_train=50", "data.toy.num_eval=7"])
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    prompts = prompts_from_run(tmp_path / "run")
    assert len(prompts) == 7 and all(p.endswith("=") and "+" in p for p in prompts)
    assert prompts_from_run(tmp_path) is None  # no .hydra: no default probes
    (tmp_path / "p.txt").write_text("1+2=\n\n3+4=\n")
    assert load_probe_file(tmp_path / "p.txt") == [{"prompt": "1+2="}, {"prompt": "3+4="}]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoints", "/nonexistent/rl_step_1", "--out", "x"],
            "--checkpoints /nonexistent/rl_step_1: not a directory",
        ),
        (["--run-dir", "{tmp}/empty"], "no checkpoints/rl_step_N/hf folders"),
        (
            ["--checkpoints", "{tmp}/rl_step_0", "{tmp}/rl_step_1", "--steps", "0", "--out", "x"],
            "--steps: expected 2 steps",
        ),
        (
            [
                "--checkpoints",
                "{tmp}/rl_step_0",
                "{tmp}/rl_step_1",
                "{tmp}/rl_step_3",
                "--out",
                "{tmp}/o",
                "--no-probes",
            ],
            "at least 4 checkpoints; got 3",
        ),
        (
            ["--checkpoints", "{tmp}/rl_step_0", "{tmp}/rl_step_1", "{tmp}/odd_9", "--out", "{tmp}/o"],
            "no step in the path",
        ),
        (
            [
                "--checkpoints",
                "{tmp}/rl_step_0",
                "{tmp}/rl_step_1",
                "{tmp}/rl_step_2",
                "{tmp}/rl_step_3",
                "--out",
                "{tmp}/o",
                "--no-probes",
            ],
            "rl_step_2: tensor w has shape [5], the first checkpoint [4]",
        ),
        (
            ["--checkpoints", "{tmp}/rl_step_0", "{tmp}/notckpt", "--steps", "0", "1", "--out", "x"],
            "expected model.safetensors",
        ),
        (
            [
                "--checkpoints",
                "{tmp}/rl_step_0",
                "{tmp}/rl_step_1",
                "{tmp}/rl_step_3",
                "--out",
                "{tmp}/o",
                "--probes",
                "{tmp}/bad.jsonl",
            ],
            "--probes {tmp}/bad.jsonl: expected records with a string 'prompt'",
        ),
        (
            ["--run-dir", "{tmp}/empty", "--weight-fraction", "2"],
            "analysis.weight_fraction: expected a number in (0, 1]",
        ),
    ],
)
def test_cli_bad_input_fails_with_one_line(tmp_path, capsys, args, message):
    import torch

    from orchestrator.analyze import main

    for t in (0, 1, 3):
        _write_ckpt(tmp_path / f"rl_step_{t}", {"w": torch.zeros(4)})
    _write_ckpt(tmp_path / "rl_step_2", {"w": torch.zeros(5)})
    _write_ckpt(tmp_path / "odd_9", {"w": torch.zeros(4)})
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1="}\n')
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err[0]


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_analyze_a_real_training_runs_checkpoints(ray_session, cache_dir, tmp_path, monkeypatch):
    """A 6-step GRPO job (Ray + vLLM + DeepSpeed) keeping a checkpoint every 2 steps, then
    `python -m orchestrator.analyze --run-dir`: JSON + PNGs on disk and as artifacts of the job's MLflow run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.analyze import main
    from orchestrator.config import validate
    from orchestrator.toy_task import write_toy_dataset
    from orchestrator.train import run_job
    from tests.helpers import compose_cfg, small_job_overrides

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(
        small_job_overrides(cache_dir, tmp_path, steps=6)
        + [
            "schedule=rl",
            "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=0",
            "trainer.eval_every=0",
            "learner.lr=5e-4",
            "analysis.enabled=true",
            "analysis.num_probes=8",
            "analysis.weight_fraction=0.01",
            "analysis.plots=false",
        ]
    )
    summary = run_job(cfg, str(tmp_path / "out"))
    # the trainer's own end-of-job analysis (analysis.enabled): the warm start + 3 checkpoints
    assert summary["linearity"]["checkpoints"] == 4 and 0.0 <= summary["linearity"]["weights_r2_median"] <= 1.0
    assert json.loads((tmp_path / "out" / "linearity" / "linearity.json").read_text())["steps"] == [0, 2, 4, 6]
    job = validate(cfg)
    eval_file = write_toy_dataset(Path(cache_dir) / "data", job.data.toy, job.seed)["eval"]

    code = main(
        [
            "--run-dir",
            str(tmp_path / "out"),
            "--probes",
            str(eval_file),
            "--num-probes",
            "16",
            "--weight-fraction",
            "0.01",
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0
    out = tmp_path / "out" / "linearity"
    result = json.loads((out / "linearity.json").read_text())
    assert result["steps"] == [0, 2, 4, 6]  # the warm start from summary.json, then the job's checkpoints
    assert result["checkpoints"][0] == summary["model_path"]
    w = result["weights"]
    assert w["r2"]["count"] > 100 and 0.0 <= w["r2"]["median"] <= 1.0
    assert set(w["per_layer_mean"]) == {"0", "1", "global"}
    assert result["logprobs"]["tokens"] > 0 and result["logprobs"]["r2_all"]["count"] > 0
    for name in result["plots"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "linearity")}
    assert {"linearity/linearity.json", "linearity/overview.png", "linearity/probes.jsonl"} <= artifacts
    median = client.get_metric_history(summary["mlflow_run_id"], "linearity/weight_r2_median")
    assert len(median) == 2 and median[-1].step == 6  # the job's analysis, then the CLI's
    assert median[-1].value == pytest.approx(w["r2"]["median"])
