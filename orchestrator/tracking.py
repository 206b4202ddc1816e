"""MLflow tracking: one run per job (nested runs per phase are added by the RL-Extra schedule).

The store is `tracking.tracking_uri` (default `sqlite:///mlflow.db` in the launch directory) unless
`MLFLOW_TRACKING_URI` is set, which wins, so a team server is one environment variable away. An experiment this
module creates in a local SQLite store keeps its artifacts beside the database (`<db dir>/mlruns/<experiment>`), not in
MLflow's default `./mlruns` of whatever directory the job was launched from: a `ray job submit` driver runs in a
temporary working directory, and a store named by an absolute path would otherwise lose its artifacts with it.

The experiment carries MLflow's experiment-kind tag for model training (`mlflow.experimentKind`; MLflow 3.17's UI
still opens on its GenAI side until the user picks "Model training", see the README). A job's run is named by what
tells runs apart in the runs table: algorithm, schedule (with RL-Extra's strategy and β mode), data and start time,
e.g. `grpo-rl_extra-lookahead-fixed-toy_add2-20260101-120000` (the default) next to
`grpo-rl_extra-auto-toy_add2-20260101-130000` (`schedule=rl_extra`) and `grpo-rl-toy_add2-20260101-140000`;
`tracking.run_name` overrides it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from orchestrator.config import to_container, to_yaml

# MLflow 3's experiment kinds (mlflow/server/js: ExperimentKind): "custom_model_development" is "Model training".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    """Thin wrapper over the MLflow client API (no global active-run state, so it is thread-safe)."""

    def __init__(self, cfg, run_name: str | None = None, resume_run_id: str | None = None):
        """cfg: the typed job or evaluation config (its `tracking` section names the store and experiment)."""
        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._model_training_experiment(cfg.tracking.experiment)
        self.skip_through = -1  # on resume: steps the run already holds (replayed identically, not logged twice)
        self._existing_phases: dict[str, str] = {}
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            logged = self.client.get_metric_history(resume_run_id, "rl_step")
            self.skip_through = max((int(m.step) for m in logged), default=-1)
            children = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{resume_run_id}'", max_results=5000
            )
            self._existing_phases = {r.info.run_name: r.info.run_id for r in children}
        else:
            name = run_name or cfg.tracking.run_name or default_run_name(cfg)
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"rlextra.kind": "job"})
            self.run_id = run.info.run_id

    def _model_training_experiment(self, name: str) -> str:
        """The experiment's id (created if new), tagged as model training unless someone already chose a kind."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(
                name,
                artifact_location=local_artifact_location(self.uri, name),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
            )
        if EXPERIMENT_KIND_TAG not in exp.tags:
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id

    def start_phase(self, name: str, kind: str, params: dict | None = None) -> str | None:
        """A nested run under the job's run for one RL or extrapolation phase; returns its id."""
        if not self.enabled:
            return None
        if name in self._existing_phases:  # resuming: the phase run of the interrupted attempt continues
            run_id = self._existing_phases.pop(name)
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.run_id, "rlextra.kind": kind},
        )
        if params:
            from mlflow.entities import Param

            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def prepare_replay(self, logged_through: int) -> None:
        """Steps up to `logged_through` will be run again (after a learner restart): don't log them twice, and
        let the phases they open continue their existing nested runs."""
        self.skip_through = max(self.skip_through, logged_through)
        if self.enabled:
            children = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=5000
            )
            self._existing_phases = {r.info.run_name: r.info.run_id for r in children}

    def reopen_phase(self, run_id: str) -> None:
        """A phase run that a checkpoint interrupted is RUNNING again after a resume."""
        if self.enabled and run_id:
            self.client.update_run(run_id, status="RUNNING")
            self._existing_phases = {k: v for k, v in self._existing_phases.items() if v != run_id}

    def log_phase_metrics(self, run_id: str | None, metrics: dict, step: int) -> None:
        if self.enabled and run_id and step > self.skip_through:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            )

    def end_phase(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)

    def log_config(self, cfg) -> None:
        """Every field of the typed config as a param, and the whole config as `config.yaml`."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(to_container(cfg)).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.log_text(to_yaml(cfg), "config.yaml")

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled or step <= self.skip_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_json(self, obj, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, default=str), artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """`<db dir>/mlruns/<experiment, as a file name>` for a store `sqlite:///<path>`; None (the store's default, e.g. a
    tracking server's artifact root) otherwise. Runs keep MLflow's `<run id>/artifacts` layout under it."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str((db.parent / "mlruns" / folder).resolve())


def default_run_name(cfg) -> str:
    """`<algo>-<schedule>[-<strategy>][-<beta_mode>]-<data>-<start time>`: RL-Extra's strategy (unless the paper's
    `extrapolate`) and β mode, e.g. `grpo-rl_extra-lookahead-fixed-toy_add2-…`, `grpo-rl_extra-auto-toy_add2-…`."""
    s = cfg.schedule
    strategy = "" if s.strategy == "extrapolate" else f"-{s.strategy}"
    schedule = s.name if s.name == "rl" else f"{s.name}{strategy}-{s.beta_mode}"
    return f"{cfg.algo.name}-{schedule}-{_data_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _data_name(cfg) -> str:
    """toy_add2 (toy task and digits; toy_code), the hub dataset's name, or the first train file's stem."""
    data = cfg.data
    if data.source == "toy":
        return f"toy_{data.toy.op}" if data.toy.op == "code" else f"toy_{data.toy.op}{data.toy.digits}"
    if data.source == "hub":
        return data.hub_id.rsplit("/", 1)[-1]
    files = [data.train_files] if isinstance(data.train_files, str) else list(data.train_files)
    return Path(files[0]).stem
