"""Ray placement and cluster runs.

Unit: the `cluster.*` config (RAY_ADDRESS, validation with one-line errors, both group files alike) and the pure
placement plan. Slow, on real Ray clusters started here:
- a 3-node Ray cluster (`ray.cluster_utils.Cluster`, custom resources per node) with the rollout engine on one node
  and two ZeRO-3 learner ranks on the two others; two real RL steps through `orchestrator.train.Job` with
  `cluster=existing`. It runs in a child process (this file's `__main__`): a driver joins one cluster only, and the
  test session may already hold its own local Ray.
- `ray start --head` on loopback (own temp dir and ports) and `ray job submit --working-dir <repo>` of the job;
  the head's process group (and its workers) is killed at the end, never `ray stop` (it would stop every Ray on
  the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import compose_cfg, free_ports, tiny_job_overrides

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# What a job's working_dir upload leaves out (the README's runtime env lists the same).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    ".cache",
    "outputs",
    "multirun",
    "mlruns",
    "mlflow.db",
    "checkpoints",
    "bench/results",
    "**/__pycache__",
    ".pytest_cache",
]


# ------------------------------------------------------------------------------------------------ unit


def test_existing_cluster_address_follows_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert compose_cfg(["cluster=existing"]).cluster.address == "10.1.2.3:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert compose_cfg(["cluster=existing"]).cluster.address == "auto"
    assert compose_cfg(["cluster=existing", "cluster.address=ray://head:10001"]).cluster.address == "ray://head:10001"


def test_cluster_presets_differ_only_where_they_say(monkeypatch):
    """Both presets override ClusterConfig (the one schema): an existing cluster differs from a local Ray only in
    mode, address, streamed logs and the SPREAD placement."""
    from dataclasses import asdict

    from orchestrator.config import validate

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local, existing = (asdict(validate(compose_cfg([f"cluster={c}"])).cluster) for c in ("local", "existing"))
    differ = {k for k in local if local[k] != existing[k]}
    assert differ == {"mode", "address", "log_to_driver", "placement_strategy"}
    assert existing["address"] == "auto" and existing["placement_strategy"] == "SPREAD"


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.learner_strategy=SOMETIMES", "cluster.learner_strategy: expected one of"),
        (
            "cluster.rollout_resources={rollout_node:-1}",
            "cluster.rollout_resources: expected a number >= 0 for 'rollout_node'",
        ),
        ("cluster.learner_resources={CPU:2}", "cluster.learner_resources: 'CPU' is set by rollout/learner num_cpus"),
        ("cluster.rollout_resources=[1,2]", "cluster.rollout_resources: expected a mapping"),
        ("cluster.max_rollout_restarts=-1", "cluster.max_rollout_restarts: expected an integer >= 0"),
        ("cluster.placement_timeout_s=0", "cluster.placement_timeout_s: expected a number > 0"),
        ("cluster.address=http://head:8265", "cluster.address: expected the cluster's GCS address"),
    ],
)
def test_bad_cluster_values_fail_with_one_line(override, message):
    from orchestrator.config import ConfigError, validate

    cfg = compose_cfg(["cluster=existing", override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_default_plan_is_one_shared_placement_group():
    from orchestrator.cluster import plan_placement
    from orchestrator.config import validate

    cfg = validate(compose_cfg(["rollout.num_actors=2", "learner.world_size=2", "learner.num_cpus=2"]))
    plan = plan_placement(cfg.cluster, cfg.rollout, cfg.learner, num_rollouts=2, world_size=2)
    assert len(plan.groups) == 1 and plan.groups[0].strategy == "PACK"
    assert list(plan.groups[0].bundles) == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert plan.rollout_slots == ((0, 0), (0, 1)) and plan.learner_slots == ((0, 2), (0, 3))


def test_per_group_plan_with_custom_resources():
    from orchestrator.cluster import plan_placement
    from orchestrator.config import validate

    cfg = compose_cfg(
        [
            "cluster=existing",
            "learner.world_size=3",
            "trainer.prompts_per_step=24",  # 24 x 8 samples split over 3 ranks of 64
            "rollout.num_cpus=0",
            "learner.num_gpus=1",
            "cluster.learner_strategy=STRICT_SPREAD",
            "cluster.rollout_resources={rollout_node:1}",
            "cluster.learner_resources={learner_node:0.5}",
        ]
    )
    cfg = validate(cfg)
    plan = plan_placement(cfg.cluster, cfg.rollout, cfg.learner, num_rollouts=1, world_size=3)
    rollout, learner = plan.groups
    assert (rollout.name, rollout.strategy, list(rollout.bundles)) == ("rollout", "SPREAD", [{"rollout_node": 1.0}])
    assert learner.strategy == "STRICT_SPREAD"
    assert list(learner.bundles) == [{"CPU": 1.0, "GPU": 1.0, "learner_node": 0.5}] * 3
    assert plan.rollout_slots == ((0, 0),) and plan.learner_slots == ((1, 0), (1, 1), (1, 2))


def test_a_kv_cache_warning_names_what_sized_the_cache_and_only_when_a_batch_overflows_it():
    from orchestrator.cluster import kv_cache_warning
    from orchestrator.config import RolloutConfig

    assert kv_cache_warning(RolloutConfig(), held=256, batch=2000) is None  # an engine step takes max_num_seqs
    assert kv_cache_warning(RolloutConfig(kv_cache_mb=1), held=8, batch=8) is None  # the whole batch fits
    small = kv_cache_warning(RolloutConfig(kv_cache_mb=1), held=8, batch=100)
    assert small.startswith("warning: the rollout engines' KV cache (rollout.kv_cache_mb=1) holds 8 sequences of ")
    assert "an engine is handed 100 at once" in small
    gpu = kv_cache_warning(RolloutConfig(num_gpus=1, kv_cache_mb=0, gpu_memory_utilization=0.1), held=3.5, batch=512)
    assert "(rollout.gpu_memory_utilization=0.1) holds 3 sequences" in gpu and "handed 256 at once" in gpu
    assert "(its default size)" in kv_cache_warning(RolloutConfig(max_model_len=48), held=10, batch=20)


def test_rollout_only_plan_reserves_no_learner_group():
    """Evaluation engines (`start_actor_groups` without a learner) go through the job's plan with no learner ranks
    (the evaluation's config has no learner section)."""
    from orchestrator.cluster import plan_placement
    from orchestrator.config import EvaluateConfig, to_typed

    def plan(overrides):
        cfg = to_typed(compose_cfg(overrides, "evaluate"), EvaluateConfig)
        return plan_placement(cfg.cluster, cfg.rollout, None, num_rollouts=2, world_size=0)

    shared = plan([])
    assert [(g.name, g.strategy, list(g.bundles)) for g in shared.groups] == [("job", "PACK", [{"CPU": 1.0}] * 2)]
    per_group = plan(["cluster.rollout_strategy=SPREAD"])
    assert [(g.name, g.strategy) for g in per_group.groups] == [("rollout", "SPREAD")]
    assert shared.rollout_slots == per_group.rollout_slots == ((0, 0), (0, 1)) and not per_group.learner_slots


# ------------------------------------------------------------------------------------- multi-node Ray


def _multinode_run(cache_dir: str, out_dir: str) -> dict:
    """Child process: a 3-node Ray cluster on this machine; rollout engine on node A (`rollout_node`), learner
    ranks 0 and 1 on nodes B and C (`learner_node`, STRICT_SPREAD); two RL steps through the real job."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.train import Job

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"rollout_node": 1}, "include_dashboard": False},
    )
    job = None
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"learner_node": 1})
        cfg = compose_cfg(
            tiny_job_overrides(cache_dir, out_dir)
            + [
                "cluster=existing",
                f"cluster.address={cluster.address}",
                "cluster.log_to_driver=false",
                "cluster.rollout_resources={rollout_node:1}",
                "cluster.learner_resources={learner_node:1}",
                "cluster.rollout_strategy=PACK",
                "cluster.learner_strategy=STRICT_SPREAD",
                "cluster.placement_timeout_s=120",
                "learner.world_size=2",
                "learner.zero_stage=3",
                "learner.micro_batch_size=8",
                "learner.num_threads=1",
            ]
        )
        job = Job(cfg, out_dir)
        job.setup()
        nodes = {
            n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node")) for n in ray.nodes() if n["Alive"]
        }

        def where(actor):
            return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

        steps = [job.rollout_and_learn(s) for s in (1, 2)]
        after = job.groups.generate([job.encode(job.train_ds[0]["prompt"])], job.sampling(2, seed=1))
        return {
            "node_resources": nodes,
            "rollout_nodes": [where(r) for r in job.groups.rollouts],
            "learner_nodes": [where(learner) for learner in job.groups.learners],
            "placement_groups": len(job.groups.placement_groups),
            "weight_versions": [m["perf/weight_version"] for m in steps],
            "losses": [m["train/loss"] for m in steps],
            "grad_norms": [m["train/grad_norm"] for m in steps],
            "version_after": after.weight_version,
            "responses_after": len(after.response_ids),
        }
    finally:
        if job is not None:
            job.close()
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_groups_on_different_nodes_train_and_sync(toy_model_path, cache_dir, tmp_path):
    """Learner collectives (ZeRO-3 over gloo) across two Ray nodes, and weight sync from a learner node to the
    rollout node: versions advance and the engine serves the new version."""
    out = tmp_path / "result.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_cluster", "multinode", str(cache_dir), str(tmp_path), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    by_resource = {
        res: [n for n, rs in r["node_resources"].items() if res in rs] for res in ("rollout_node", "learner_node")
    }
    assert len(by_resource["rollout_node"]) == 1 and len(by_resource["learner_node"]) == 2
    assert r["placement_groups"] == 2
    assert r["rollout_nodes"] == by_resource["rollout_node"]
    assert sorted(r["learner_nodes"]) == sorted(by_resource["learner_node"]), "one rank on each learner node"
    assert r["weight_versions"] == [1, 2] and r["version_after"] == 2 and r["responses_after"] == 2
    assert all(loss == loss for loss in r["losses"]) and all(g > 0 for g in r["grad_norms"])


# ---------------------------------------------------------------------------------------- ray job submit


def _descendants_of_group(pgid: int) -> set[int]:
    """PIDs in process group `pgid` and all their descendants (Ray workers start their own process groups)."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                procs[int(d)] = (int(stat[1]), int(stat[2]))  # ppid, pgrp
            except (OSError, IndexError):
                pass
    found = {p for p, (_, g) in procs.items() if g == pgid}
    while True:
        more = {p for p, (pp, _) in procs.items() if pp in found} - found
        if not more:
            return found
        found |= more


def _kill_tree(pgid: int, grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _descendants_of_group(pgid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_job_api(address: str, timeout_s: float = 120) -> None:
    """`ray start` returns before the head's job agent registers: submit a no-op job until one succeeds."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout_s
    client, job_id, last = None, None, None
    while time.time() < deadline:
        try:
            client = client or JobSubmissionClient(address)
            job_id = job_id or client.submit_job(entrypoint="true")
            status = client.get_job_status(job_id)
            if status == JobStatus.SUCCEEDED:
                return
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                raise RuntimeError(f"no-op job {status}: {client.get_job_logs(job_id)[-2000:]}")
        except (RuntimeError, ConnectionError) as exc:  # "No available agent to submit job" while starting
            if "no-op job" in str(exc):
                raise
            last = exc
        time.sleep(1.0)
    raise TimeoutError(f"Ray job API at {address} not ready in {timeout_s} s: {last}")


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with its own temp dir and ports; yields the dashboard (job API) URL."""
    temp_dir = tempfile.mkdtemp(prefix="rxj", dir="/tmp")  # short: Ray's unix sockets live under it
    # Every port explicit: another Ray on this machine holds the defaults (the agent's 52365 above all).
    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics = free_ports(7)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")
    }  # the job gets the upload only
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=6",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out[-3000:]
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_api(address)
        yield address, env
    finally:
        _kill_tree(head.pid)
        left = [p for p in _descendants_of_group(head.pid) if _alive(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive: {left}"


@pytest.mark.slow
def test_ray_job_submit_runs_the_job(ray_head, toy_model_path, cache_dir, tmp_path):
    """The README's `ray job submit --working-dir . -- python -m orchestrator.train cluster=existing ...`, on a
    real Ray head; the job's summary.json and MLflow run are read back."""
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    out_dir = tmp_path / "out"
    runtime_env = {"excludes": WORKING_DIR_EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}}
    proc = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "orchestrator.train",
            "cluster=existing",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *tiny_job_overrides(cache_dir, out_dir),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and "succeeded" in proc.stdout, log
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["rl_steps"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["cluster.mode"] == "existing"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "perf/weight_version")] == [1.0, 2.0]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "multinode":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = _multinode_run(sys.argv[2], sys.argv[3])
    Path(sys.argv[4]).write_text(json.dumps(result))
