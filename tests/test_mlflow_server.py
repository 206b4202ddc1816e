"""A real `mlflow server` on loopback as the job's tracking store (`MLFLOW_TRACKING_URI=http://...`).

One module-scoped server (SQLite backend, proxied artifacts in a temp dir) and one short RL-Extra job against it
(m = 1, n = 1, β from the schedule, 2 real steps: nested runs `rl-phase-1`, `extrapolation-1`, `rl-phase-2`). The
job's runs, metrics and artifacts are read back through the REST client. Headless Chromium then renders the UI as a
user opens it on the model-training side: the experiment's runs table must name the job's run, and the run's metric
page must draw the reward and eval curves against the step axis (= rl_step), point by point; the screenshots are kept
under bench/results/ for a person to look at. The server's process group is killed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import compose_cfg, free_ports, tiny_job_overrides

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy in {timeout_s} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, grace_s: float = 8) -> None:
    import os

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the server and its uvicorn workers: the group we started
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            time.sleep(0.5)  # workers of the group exit with the server
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{root / 'server.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server_job(mlflow_server, ray_session, toy_model_path, cache_dir, tmp_path_factory):
    """The job, run once against the server under its default run name. Returns (summary, local output dir)."""
    from orchestrator.train import run_job

    out_dir = tmp_path_factory.mktemp("server-job")
    overrides = tiny_job_overrides(cache_dir, out_dir) + [
        "schedule=rl_extra",
        "schedule.m=1",
        "schedule.n=1",
        "schedule.beta_mode=schedule",
        "schedule.selection=names",
        "tracking.experiment=server-test",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        summary = run_job(compose_cfg(overrides), str(out_dir))
    return summary, out_dir


@pytest.mark.slow
def test_job_logs_nested_phases_to_a_remote_server(mlflow_server, server_job):
    from mlflow.tracking import MlflowClient

    summary, out_dir = server_job
    assert summary["mlflow_tracking_uri"] == mlflow_server
    assert not (out_dir / "mlflow.db").exists(), "MLFLOW_TRACKING_URI wins over tracking.tracking_uri"
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert re.fullmatch(r"grpo-rl_extra-schedule-toy_add1-\d{8}-\d{6}", parent.info.run_name), parent.info.run_name
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # model training, not GenAI
    assert parent.data.params["schedule.name"] == "rl_extra" and parent.data.tags["rlextra.kind"] == "job"
    for name in ("rl_step", "virtual_step", "train/reward_mean", "train/loss", "perf/weight_version"):
        assert [m.step for m in client.get_metric_history(parent.info.run_id, name)] == [1, 2], name
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "rl_step")] == [1.0, 2.0]

    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    # One RL phase per real step (m = 1); a projection after each but the last (nothing would re-ground it).
    assert sorted(by_name) == ["extrapolation-1", "rl-phase-1", "rl-phase-2"]
    for k in (1, 2):
        phase = by_name[f"rl-phase-{k}"]
        assert phase.info.status == "FINISHED" and phase.data.tags["rlextra.kind"] == "rl_phase"
        reward = client.get_metric_history(phase.info.run_id, "train/reward_mean")
        assert [m.step for m in reward] == [k] and 0.0 <= reward[0].value <= 1.0
    extra = by_name["extrapolation-1"]
    assert extra.info.status == "FINISHED" and extra.data.tags["rlextra.kind"] == "extrapolation_phase"
    # beta_mode=schedule, no guard margin: the schedule's β = (m + n) / m is applied, whatever validation would say
    assert extra.data.metrics["extra/made"] == 1.0 and extra.data.metrics["extra/skipped"] == 0.0
    assert extra.data.metrics["extra/beta"] == extra.data.metrics["extra/beta_max"] == 2.0
    virtual = [m.value for m in client.get_metric_history(parent.info.run_id, "virtual_step")]
    assert virtual == [2.0, 3.0]  # the projection after step 1 stands for one more step

    # Artifacts go through the server's artifact proxy.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json", "rl_extra"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "summary.json", str(out_dir))
    assert json.loads(Path(local).read_text())["mlflow_run_id"] == parent.info.run_id


def _chromium(page: str, shot: Path, profile: Path, budget_ms: int, height: int) -> str:
    """Headless Chromium renders `page` for `budget_ms` of virtual time: the DOM it ends with, and a screenshot."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size=1400,{height}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={shot}",
            "--dump-dom",
            page,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]
    return proc.stdout


def _render(page: str, name: str, tmp_path: Path, ready, height: int = 900) -> str:
    """The page's DOM once `ready(dom)` holds (the single-page app fetches after it loads: a slow machine gets a
    second, longer try); the screenshot goes to bench/results/<name>.png."""
    shot = tmp_path / f"{name}.png"
    for budget_ms in (20000, 60000):
        dom = _chromium(page, shot, tmp_path / "profile", budget_ms, height)
        if ready(dom):
            break
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, results / shot.name)
    print(f"MLflow UI screenshot: {results / shot.name}")
    return dom


class RenderedPlot(HTMLParser):
    """What a rendered page shows, from its DOM: every text on it, and of the Plotly chart on it the points each
    trace drew, the x-axis tick labels and the x-axis title."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, dom: str):
        super().__init__()
        self.texts: list[str] = []
        self.trace_points: list[int] = []  # per Plotly trace (`g.trace`), its `path.point` markers
        self.xticks: list[str] = []
        self.xtitle = ""
        self.stack: list[set[str]] = []  # the classes of every open element
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        self.stack.append(classes)
        if tag == "g" and "trace" in classes:
            self.trace_points.append(0)
        elif tag == "path" and "point" in classes and self.trace_points:
            self.trace_points[-1] += 1

    def handle_endtag(self, tag):
        if self.stack and tag not in self.VOID:
            self.stack.pop()

    def handle_data(self, data):
        text = data.strip()
        if not text or any({"script", "style"} & c for c in self.stack):
            return
        self.texts.append(text)
        if any("xtick" in c for c in self.stack):
            self.xticks.append(text)
        elif any("xtitle" in c for c in self.stack):
            self.xtitle = text


def _js_number(value: float) -> str:
    """A float as JavaScript prints it (shortest round trip, no trailing `.0`)."""
    return repr(value).removesuffix(".0")


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_table_and_the_curves(mlflow_server, server_job, tmp_path):
    """The experiment on MLflow's model-training side: the runs table names the job's run; the run's metric page draws
    train/reward_mean (rl_steps 1, 2) and eval/avg_at_k (0: before training, and 2) against the step axis, which is
    rl_step (every metric is logged at its rl_step), one Plotly marker per logged point, and tabulates the latest /
    min / max of each as the REST API reads them."""
    from mlflow.tracking import MlflowClient

    summary, _ = server_job
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    exp, run_id, run_name = run.info.experiment_id, run.info.run_id, run.info.run_name
    side = "workflowType=machine_learning"  # MLflow 3.17 opens on its GenAI side unless told (see the README)

    page = _render(
        f"{mlflow_server}/#/experiments/{exp}/runs?{side}", "mlflow_ui_runs", tmp_path, lambda d: run_name in d
    )
    texts = set(RenderedPlot(page).texts)
    assert run_name in texts, f"the runs table does not name {run_name}: {sorted(texts)}"
    assert {"Runs", "Models", "Run Name"} <= texts and not {"Evaluation runs", "Judges"} & texts, "not model training"

    keys = ["train/reward_mean", "eval/avg_at_k"]
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    assert [s for s, _ in history["train/reward_mean"]] == [1, 2] and [s for s, _ in history["eval/avg_at_k"]] == [0, 2]
    query = "&".join(
        [
            f"runs={json.dumps([run_id])}",
            f"metric={quote(json.dumps(keys[0]))}",
            f"experiments={json.dumps([exp])}",
            f"plot_metric_keys={quote(json.dumps(keys))}",
            "plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true",
            f"deselected_curves=[]&last_linear_y_axis_range=[]&{side}",
        ]
    ).replace(" ", "")
    plot = RenderedPlot(
        _render(
            f"{mlflow_server}/#/metric/?{query}",
            "mlflow_ui_curves",
            tmp_path,
            lambda d: sum(RenderedPlot(d).trace_points) == 4,
        )
    )
    assert sorted(n for n in plot.trace_points if n) == [2, 2], plot.trace_points  # 2 points per curve
    assert plot.xtitle == "Step" and {"0", "1", "2"} <= set(plot.xticks), (plot.xtitle, plot.xticks)
    texts = plot.texts
    for key, points in history.items():
        assert f"{run_name} ({key})" in texts, f"no legend entry for {key}"
        (min_step, min_value), (max_step, max_value) = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
        row = texts[texts.index(key, texts.index("Max")) :][:4]  # the summary table: metric, latest, min, max
        last_step, last_value = points[-1]
        assert row == [
            key,
            f"{_js_number(last_value)} (step={last_step})",
            f"{_js_number(min_value)} (step={min_step})",
            f"{_js_number(max_value)} (step={max_step})",
        ], row
