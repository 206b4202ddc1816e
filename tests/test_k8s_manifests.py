"""Kubernetes manifests (k8s/): every kustomization renders and every object it sends validates (KubeRay CRD
schemas for RayCluster / RayJob, kubernetes-validate for core kinds); the RayJob entrypoints resolve to the real
module, compose with Hydra and pass orchestrator.config.validate; the pieces agree with each other (the two Ray
clusters, GPU counts, MLflow URI / Service / Secret / allowed hosts, runtime env pins vs pyproject.toml); broken
manifests are rejected; the renderer's output equals what `kubectl kustomize` rendered (committed, so no test needs
kubectl). Everything but the last test runs in a few seconds without a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE_OUTPUT = ROOT / "tests" / "data" / "kustomize"  # `kubectl kustomize k8s/<kustomization>`, committed
_spec = importlib.util.spec_from_file_location("rlextra_k8s_check", ROOT / "k8s" / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check
_spec.loader.exec_module(check)

VARIANTS = ["cpu-smoke", "gpu"]
SHARED_MOUNT = "/mnt/rlextra"
KUSTOMIZATIONS = {
    f"{prefix}/{part}"
    for prefix in ["base", "overlays/cpu-smoke", "overlays/gpu"]
    for part in ["platform", "raycluster", "rayjob"]
}


@pytest.fixture(scope="module")
def report():
    return check.validate_all()


def rendered(report, rel: str, kind: str) -> list[dict]:
    return [m.obj for m in report.rendered[rel] if m.kind == kind]


def one(report, rel: str, kind: str) -> dict:
    objs = rendered(report, rel, kind)
    assert len(objs) == 1, f"{rel}: expected one {kind}, got {len(objs)}"
    return objs[0]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


# ------------------------------------------------------------------------------------------ schemas


def test_every_manifest_renders_and_validates(report):
    assert set(report.rendered) == KUSTOMIZATIONS
    for prefix in ["base", "overlays/cpu-smoke", "overlays/gpu"]:
        kinds = sorted(m.kind for m in report.rendered[f"{prefix}/platform"])
        assert kinds == [
            "Deployment",
            "Namespace",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "Service",
            "Service",
            "StatefulSet",
        ]
        assert [m.kind for m in report.rendered[f"{prefix}/raycluster"]] == ["RayCluster"]
        assert [m.kind for m in report.rendered[f"{prefix}/rayjob"]] == ["RayJob"]
    assert [(m.kind, m.name) for m in report.standalone] == [("Secret", "rlextra-mlflow-db")]
    assert report.errors == []


def test_renderer_matches_kubectl_kustomize(report):
    """Our renderer against what `kubectl kustomize` (kustomize v5.5.0) rendered, committed under
    tests/data/kustomize/<kustomization>.yaml; after editing a manifest, re-render with
    `kubectl kustomize k8s/<kustomization> > tests/data/kustomize/<kustomization>.yaml`."""
    expected = {str(p.relative_to(KUSTOMIZE_OUTPUT).with_suffix("")) for p in KUSTOMIZE_OUTPUT.rglob("*.yaml")}
    assert expected == set(report.rendered), "one committed kubectl rendering per kustomization"
    for rel, manifests in report.rendered.items():
        theirs = yaml.safe_load_all((KUSTOMIZE_OUTPUT / f"{rel}.yaml").read_text())
        assert sorted(json.dumps(m.obj, sort_keys=True) for m in manifests) == sorted(
            json.dumps(d, sort_keys=True) for d in theirs if d
        ), f"{rel}: the renderer and kubectl kustomize disagree (or tests/data/kustomize/{rel}.yaml is stale)"


@pytest.mark.parametrize("kind", sorted(check.CRD_FILES))
def test_crd_schemas_are_kuberays_v1_crds(kind):
    crd = check.load_crd(kind)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    assert crd["spec"]["names"]["kind"] == kind
    v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert len(v1) == 1 and v1[0]["served"] and v1[0]["storage"]
    assert "spec" in check.crd_v1_schema(crd)["properties"]


# ------------------------------------------------------------------------------------------ entrypoints


def compose_entrypoint(entrypoint: str):
    """`python -m orchestrator.train <overrides>` -> the composed, validated Hydra config."""
    from orchestrator.config import compose, validate

    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "orchestrator.train"], f"unexpected entrypoint {argv[:3]}"
    assert importlib.util.find_spec(argv[2]) is not None, f"module {argv[2]} not found"
    cfg = compose(argv[3:])
    validate(cfg)
    return cfg


def quantity(value) -> float:
    """A Kubernetes CPU / count quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_capacity(spec: dict, resource: str) -> list[float]:
    """Per worker pod: the amount of `resource` Ray sees (from the ray container's limits), one entry per pod."""
    pods = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        pods += [quantity(limits.get(resource, 0))] * group["replicas"]
    return pods


@pytest.mark.parametrize("rel", ["base/rayjob", "overlays/cpu-smoke/rayjob", "overlays/gpu/rayjob"])
def test_rayjob_entrypoint_composes_and_fits_the_cluster(report, rel):
    job = one(report, rel, "RayJob")
    cfg = compose_entrypoint(job["spec"]["entrypoint"])
    assert cfg.cluster.mode == "existing"  # connects to the Ray cluster the job runs in
    assert cfg.trainer.output_dir.startswith(SHARED_MOUNT + "/")  # outlives the cluster, seen by every rank
    assert cfg.model.cache_dir.startswith(SHARED_MOUNT + "/")
    spec = cluster_spec(job)
    gpus = worker_capacity(spec, "nvidia.com/gpu")
    cpus = worker_capacity(spec, "cpu")
    need_gpus = cfg.rollout.num_actors * cfg.rollout.num_gpus + cfg.learner.world_size * cfg.learner.num_gpus
    need_cpus = cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus
    assert need_gpus <= sum(gpus) and need_cpus <= sum(cpus)
    assert max(cfg.rollout.num_gpus, cfg.learner.num_gpus) <= max(gpus)  # one bundle fits one pod
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # actors on workers only
    if rel.startswith("overlays/gpu"):
        assert cfg.model.source == "path" and cfg.model.path == "Qwen/Qwen2.5-Math-1.5B"
        assert cfg.data.source == "hub" and cfg.data.verifier == "math"
        assert need_gpus == sum(gpus) == 8  # every GPU the job holds is used
        assert cfg.rollout.dtype == "bfloat16" and cfg.learner.dtype == "bf16"
    else:
        assert cfg.model.source == "toy" and need_gpus == 0 == sum(gpus)


def test_entrypoint_check_is_not_vacuous(report):
    from hydra.errors import ConfigCompositionException

    from orchestrator.config import ConfigError

    good = one(report, "overlays/gpu/rayjob", "RayJob")["spec"]["entrypoint"]
    with pytest.raises(ConfigCompositionException):
        compose_entrypoint(good + " trainer.total_step=5")  # a typo: no such key
    with pytest.raises(ConfigError, match="learner.zero_stage"):
        compose_entrypoint(good + " learner.zero_stage=4")
    with pytest.raises(AssertionError, match="unexpected entrypoint"):
        compose_entrypoint(good.replace("python -m orchestrator.train", "python train.py"))


@pytest.mark.parametrize("variant", ["base"] + VARIANTS)
def test_runtime_env_installs_the_pinned_project(report, variant):
    rel = "base/rayjob" if variant == "base" else f"overlays/{variant}/rayjob"
    env = yaml.safe_load(one(report, rel, "RayJob")["spec"]["runtimeEnvYAML"])
    uri = urlparse(env["working_dir"])
    assert uri.scheme in {"https", "s3", "gs"} and uri.path.endswith(".zip")  # the submitter has no local checkout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["gpu" if variant == "gpu" else "cpu"]
    expected = [d for d in project["dependencies"] if not d.startswith("ray")] + extra  # ray: the image's
    assert env["pip"]["packages"] == expected


# ------------------------------------------------------------------------------------------ consistency


@pytest.mark.parametrize("variant", ["base"] + VARIANTS)
def test_raycluster_and_rayjob_cluster_share_pod_templates(report, variant):
    prefix = "base" if variant == "base" else f"overlays/{variant}"
    cluster = cluster_spec(one(report, f"{prefix}/raycluster", "RayCluster"))
    job = cluster_spec(one(report, f"{prefix}/rayjob", "RayJob"))
    assert cluster["rayVersion"] == job["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"] == job["headGroupSpec"]

    def groups(spec):
        return [(g["groupName"], g["rayStartParams"], g["template"]) for g in spec["workerGroupSpecs"]]

    assert groups(cluster) == groups(job)


@pytest.mark.parametrize("variant", ["base"] + VARIANTS)
def test_gpu_requests_and_shared_memory(report, variant):
    prefix = "base" if variant == "base" else f"overlays/{variant}"
    for kind in ["RayCluster", "RayJob"]:
        obj = one(report, f"{prefix}/{kind.lower()}", kind)
        spec = cluster_spec(obj)
        for path, template in check.pod_templates(obj):
            pod = template["spec"]
            ray = pod["containers"][0]
            shm = [v for v in pod["volumes"] if v["name"] == "dshm"][0]
            assert shm["emptyDir"]["medium"] == "Memory" and "sizeLimit" in shm["emptyDir"], path
            assert {"name": "dshm", "mountPath": "/dev/shm"} in ray["volumeMounts"], path
            gpus = ray["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
            if variant == "gpu" and "workerGroupSpecs" in path:
                assert gpus > 0 and ray["resources"]["requests"]["nvidia.com/gpu"] == gpus, path
                assert quantity(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= 16, path  # NCCL + vLLM
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            else:
                assert gpus == 0, path
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith(
            "-gpu" if variant == "gpu" else "py311"
        )


@pytest.mark.parametrize("variant", ["base"] + VARIANTS)
def test_mlflow_server_wiring(report, variant):
    from mlflow.server.security_utils import is_allowed_host_header

    prefix = "base" if variant == "base" else f"overlays/{variant}"
    platform = {(m.kind, m.name): m.obj for m in report.rendered[f"{prefix}/platform"]}
    namespace = platform[("Namespace", "rlextra")]["metadata"]["name"]
    service = platform[("Service", "rlextra-mlflow")]
    deploy = platform[("Deployment", "rlextra-mlflow")]
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    port = service["spec"]["ports"][0]["port"]

    # Ray pods log to that Service, in the same namespace.
    for kind in ["RayCluster", "RayJob"]:
        obj = one(report, f"{prefix}/{kind.lower()}", kind)
        assert obj["metadata"]["namespace"] == namespace
        for path, template in check.pod_templates(obj):
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            uri = urlparse(env["MLFLOW_TRACKING_URI"])
            assert (uri.hostname, uri.port) == (service["metadata"]["name"], port), path
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in template["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert claims == {"rlextra-shared"} and ("PersistentVolumeClaim", "rlextra-shared") in platform

    # Credentials: only from the Secret whose keys secret.example.yaml shows; the URI is assembled from them.
    secret = report.standalone[0].obj
    mlflow = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    for name in ["POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"]:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    backend = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert backend.scheme == "postgresql" and backend.password == "$(POSTGRES_PASSWORD)"
    assert backend.hostname == "rlextra-postgres" and ("Service", "rlextra-postgres") in platform

    # MLflow 3 rejects unknown Host headers: in-cluster names and port-forward pass, anything else does not.
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]
    svc = service["metadata"]["name"]
    for host in [
        svc,
        f"{svc}:{port}",
        f"{svc}.{namespace}:{port}",
        f"{svc}.{namespace}.svc.cluster.local:{port}",
        "localhost:5000",
        "127.0.0.1:5000",
    ]:
        assert is_allowed_host_header(allowed, host), host
    for host in ["evil.example.com", f"{svc}.evil.example.com:{port}", "localhost.evil.example.com"]:
        assert not is_allowed_host_header(allowed, host), host

    pvc = platform[("PersistentVolumeClaim", "rlextra-shared")]["spec"]["accessModes"]
    assert pvc == (["ReadWriteOnce"] if variant == "cpu-smoke" else ["ReadWriteMany"])


# ------------------------------------------------------------------------------------------ negatives


def _mutations():
    def worker(o):
        return cluster_spec(o)["workerGroupSpecs"][0]

    def head_pod(o):
        return cluster_spec(o)["headGroupSpec"]["template"]["spec"]

    def mlflow(o):
        return o["spec"]["template"]["spec"]["containers"][0]

    return {
        "replicas as a string": (
            "RayJob",
            lambda o: worker(o).__setitem__("replicas", "two"),
            "'two' is not of type 'integer'",
        ),
        "misspelt field": (
            "RayJob",
            lambda o: o["spec"].__setitem__("shutdownAfterJobFinish", True),
            "'shutdownAfterJobFinish' was unexpected",
        ),
        "GPU only in requests": (
            "RayJob",
            lambda o: worker(o)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
            "must be in limits",
        ),
        "/dev/shm on disk": (
            "RayJob",
            lambda o: head_pod(o)["volumes"][0]["emptyDir"].pop("medium"),
            "no emptyDir(medium: Memory) mounted at /dev/shm",
        ),
        "image of another Ray": (
            "RayCluster",
            lambda o: head_pod(o)["containers"][0].__setitem__("image", "rayproject/ray:2.9.0-py311-gpu"),
            "is not Ray 2.60.0",
        ),
        "bad runtime env": (
            "RayJob",
            lambda o: o["spec"].__setitem__("runtimeEnvYAML", "pip: {packages: [x], y: 1}"),
            "rejected by ray.runtime_env.RuntimeEnv",
        ),
        "literal password": (
            "Deployment",
            lambda o: mlflow(o)["env"].__setitem__(1, {"name": "POSTGRES_PASSWORD", "value": "hunter2"}),
            "is a literal",
        ),
        "password in the URI": (
            "Deployment",
            lambda o: mlflow(o)["env"][3].__setitem__(
                "value", "postgresql://mlflow:hunter2@rlextra-postgres:5432/mlflow"
            ),
            "embeds a literal password",
        ),
        "Deployment replicas as a string": (
            "Deployment",
            lambda o: o["spec"].__setitem__("replicas", "1"),
            "'1' is not of type 'integer'",
        ),
        "bad name": ("Service", lambda o: o["metadata"].__setitem__("name", "MLflow_UI"), "DNS-1123"),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_broken_manifests_are_rejected(report, case):
    kind, mutate, message = _mutations()[case]
    rel = {"RayJob": "overlays/gpu/rayjob", "RayCluster": "overlays/gpu/raycluster"}.get(kind, "overlays/gpu/platform")
    obj = copy.deepcopy(rendered(report, rel, kind)[0])
    assert check.validate_manifests([check.Manifest(obj, rel)]) == []
    mutate(obj)
    errors = check.validate_manifests([check.Manifest(obj, rel)])
    assert any(message in e for e in errors), errors


def test_broken_kustomizations_are_rejected(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text("resources: [ns.yaml]\n")
    (base / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")

    def overlay(body: str, patch: str = "[]") -> Path:
        d = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "kustomization.yaml").write_text(f"resources: [../base]\n{body}")
        (d / "p.yaml").write_text(patch)
        return d

    target = "patches: [{path: p.yaml, target: {kind: Namespace, name: a}}]\n"
    assert check.render(overlay(target, "[{op: add, path: /metadata/labels, value: {x: y}}]"))[0]["metadata"] == {
        "name": "a",
        "labels": {"x": "y"},
    }
    cases = {
        "unsupported fields ['commonLabels']": overlay("commonLabels: {a: b}\n"),
        "matches no resource": overlay("patches: [{path: p.yaml, target: {kind: Namespace, name: b}}]\n"),
        "test failed at /metadata/name": overlay(target, "[{op: test, path: /metadata/name, value: b}]"),
        "no field 'labels'": overlay(target, "[{op: replace, path: /metadata/labels/x, value: y}]"),
        "appears twice": overlay("resources: [../base, ../base/ns.yaml]\n"),
    }
    for message, kdir in cases.items():
        with pytest.raises(check.ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check.render(kdir)


def test_json_patch_operations():
    doc = {"a": [1, 2], "b/c": {"d": 1}}
    out = check.apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/a/1"},
            {"op": "replace", "path": "/b~1c/d", "value": 2},
            {"op": "test", "path": "/b~1c/d", "value": 2},
        ],
    )
    assert out == {"a": [0, 2, 3], "b/c": {"d": 2}} and doc == {"a": [1, 2], "b/c": {"d": 1}}
    for bad in [
        {"op": "replace", "path": "/a/5", "value": 0},
        {"op": "move", "path": "/a"},
        {"op": "remove", "path": "/zz"},
        {"op": "add", "path": "/a/9", "value": 0},
    ]:
        with pytest.raises(check.ManifestError):
            check.apply_json_patch(doc, [bad])


# ------------------------------------------------------------------------------------------ real MLflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, host: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Host": host, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if resp.headers.get_content_type() == "application/json" else {}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, ConnectionError):  # not listening yet
        return 0, {}


@pytest.mark.slow
def test_mlflow_server_with_the_deployment_settings_serves_in_cluster_clients(report, tmp_path):
    """`mlflow server` with the Deployment's args and allowed hosts (SQLite instead of PostgreSQL, loopback
    instead of 0.0.0.0): a client that reaches it by the Service name creates and reads back an experiment; a
    foreign Host header is refused."""
    deploy = rendered(report, "overlays/gpu/platform", "Deployment")[0]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = _free_port()
    args = [
        a
        for a in container["args"]
        if not a.startswith(("--host=", "--port=", "--workers=", "--artifacts-destination="))
    ]
    assert args == [] and container["command"] == ["mlflow", "server"]
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--artifacts-destination={tmp_path / 'artifacts'}",
    ]
    proc_env = os.environ | {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_SERVER_ALLOWED_HOSTS": env["MLFLOW_SERVER_ALLOWED_HOSTS"],
    }
    proc = subprocess.Popen(
        ["nice", "-n", "10", *cmd], env=proc_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    in_cluster = f"rlextra-mlflow:{port}"
    try:
        deadline = time.time() + 180
        while _request(f"http://127.0.0.1:{port}/health", in_cluster)[0] != 200:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(1)
        status, created = _request(f"{base}/experiments/create", in_cluster, {"name": "k8s-wiring"})
        assert status == 200
        status, got = _request(
            f"{base}/experiments/get?experiment_id={created['experiment_id']}",
            f"rlextra-mlflow.rlextra.svc.cluster.local:{port}",
        )
        assert status == 200 and got["experiment"]["name"] == "k8s-wiring"
        assert _request(f"{base}/experiments/search?max_results=1", f"localhost:{port}")[0] == 200
        assert _request(f"{base}/experiments/search?max_results=1", "evil.example.com")[0] == 403
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
