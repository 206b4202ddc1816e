"""MLflow tracking: one run per job (nested runs per phase are added by the RL-Extra schedule).

The store is `tracking.tracking_uri` (default `sqlite:///mlflow.db` in the launch directory) unless
`MLFLOW_TRACKING_URI` is set, which wins, so a team server is one environment variable away.
"""

from __future__ import annotations

import json
import os
import time

from orchestrator.config import to_container, to_yaml


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
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.experiment)
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
            name = (
                run_name
                or cfg.tracking.run_name
                or f"{cfg.algo.name}-{_data_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"rlextra.kind": "job"})
            self.run_id = run.info.run_id

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


def _data_name(cfg) -> str:
    if cfg.data.source == "toy":
        return f"toy_{cfg.data.toy.op}{cfg.data.toy.digits}"
    return str(cfg.data.source)
