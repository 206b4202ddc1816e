"""A real `mlflow server` on loopback as the job's tracking store (`MLFLOW_TRACKING_URI=http://...`).

One module-scoped server (SQLite backend, proxied artifacts in a temp dir) and one short RL-Extra job against it
(m = 1, n = 1, 2 real steps: nested runs `rl-phase-1`, `extrapolation-1`, `rl-phase-2`). The job's runs, metrics and
artifacts are read back through the REST client; headless Chromium then renders the server's UI and the page must
name the job's run (the screenshot is kept under bench/results/ for a person to look at). The server's process
group is killed at the end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

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
    """The job, run once against the server. Returns (summary, run name, local output dir)."""
    from orchestrator.train import run_job

    out_dir = tmp_path_factory.mktemp("server-job")
    run_name = f"ui-check-{uuid.uuid4().hex[:6]}"  # short: the runs table shows it whole
    overrides = tiny_job_overrides(cache_dir, out_dir) + [
        "schedule=rl_extra",
        "schedule.m=1",
        "schedule.n=1",
        "schedule.beta_mode=schedule",
        "schedule.selection=names",
        "tracking.experiment=server-test",
        f"tracking.run_name={run_name}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        summary = run_job(compose_cfg(overrides), str(out_dir))
    return summary, run_name, out_dir


@pytest.mark.slow
def test_job_logs_nested_phases_to_a_remote_server(mlflow_server, server_job):
    import json

    from mlflow.tracking import MlflowClient

    summary, run_name, out_dir = server_job
    assert summary["mlflow_tracking_uri"] == mlflow_server
    assert not (out_dir / "mlflow.db").exists(), "MLFLOW_TRACKING_URI wins over tracking.tracking_uri"
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_name
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
    assert extra.data.metrics["extra/beta_max"] == 2.0  # the schedule's (m + n) / m
    assert extra.data.metrics["extra/beta"] == (2.0 if extra.data.metrics["extra/made"] else 1.0)
    virtual = [m.value for m in client.get_metric_history(parent.info.run_id, "virtual_step")]
    assert virtual == (
        [2.0, 3.0] if extra.data.metrics["extra/made"] else [1.0, 2.0]
    )  # a made projection: +1 virtual step

    # Artifacts go through the server's artifact proxy.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json", "rl_extra"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "summary.json", str(out_dir))
    assert json.loads(Path(local).read_text())["mlflow_run_id"] == parent.info.run_id


def _chromium(args: list[str], profile: Path, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_mlflow_ui_lists_the_job_run(mlflow_server, server_job, tmp_path):
    """Headless Chromium renders the experiment's runs page; the rendered DOM names the job's run."""
    from mlflow.tracking import MlflowClient

    summary, run_name, _ = server_job
    exp = MlflowClient(tracking_uri=mlflow_server).get_run(summary["mlflow_run_id"]).info.experiment_id
    page = f"{mlflow_server}/#/experiments/{exp}/runs"
    dom = ""
    for budget_ms in (15000, 45000):  # the SPA fetches runs after it loads; give a slow machine a second chance
        proc = _chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", page], tmp_path / "profile")
        dom = proc.stdout
        if run_name in dom:
            break
    assert run_name in dom, f"{page} does not name {run_name}; DOM tail: {dom[-1500:]} stderr: {proc.stderr[-1500:]}"

    shot = tmp_path / "mlflow_ui.png"
    proc = _chromium([f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", page], tmp_path / "profile")
    assert shot.exists(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, "a rendered page, not a blank one"
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, results / "mlflow_ui.png")
    print(f"MLflow UI screenshot: {results / 'mlflow_ui.png'} (and {shot})")
