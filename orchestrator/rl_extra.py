"""RL-Extra's driver side: cycles of m real RL steps, each ended by an extrapolation phase.

The `ExtrapolatorActor` (actors/extrapolator.py) decides and carries out each phase on the learners' shards; this
class keeps the schedule around the job's loop:

- anchors: every rank snapshots its shard at the cycle start (or one step before the cycle's end for
  `anchor=previous_step`);
- counters: `virtual_step` (+ (β − 1) · span per projection made) and the made / skipped / rolled-back counts;
- MLflow: a nested run per RL phase (`rl-phase-k`: the cycle's training metrics) and per extrapolation phase
  (`extrapolation-k`: β, tensors and elements projected, displacement norm, drift share, R², validation reward
  before / after, guard decisions, time), plus `rl_extra/extrapolation-k.json` with every candidate and reason;
- failures: a rollout engine that dies during a phase fails the actor's call; the driver restarts it (it alone
  restarts actors), restores every rank to the phase-start weights, re-syncs the engines and records the phase
  as skipped. A dead learner rank propagates to the job loop, which restarts the learner group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from actors.extrapolator import ExtrapolationPolicy, ExtrapolationRecord, ExtrapolatorActor
from actors.groups import ActorGroups
from orchestrator.config import ScheduleConfig
from orchestrator.messages import SamplingConfig
from orchestrator.tracking import Tracker


@dataclass(frozen=True)
class ValidationBatch:
    """The fixed prompts (a slice of the train split, never the held-out eval split) that score projections."""

    prompt_ids: list[list[int]]
    answers: list[str]
    sampling: SamplingConfig  # fixed seed: every candidate sees the same randomness


class RLExtraSchedule:
    """The schedule around the job's loop: `before_step` / `after_step` per real step, `state` for checkpoints."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        *,
        total_steps: int,
        groups: ActorGroups,
        tracker: Tracker,
        validation: ValidationBatch | None,
        verifier: str,
        reward_timeout_s: float,
        evaluate: Callable[[], dict],
        log: Callable[[str], None],
    ):
        import ray

        self.cfg, self.m, self.total_steps = cfg, cfg.m, total_steps
        self.groups, self.tracker, self.evaluate, self.log = groups, tracker, evaluate, log
        self.selected: list[str] = []
        self.skipped: list[str] = []
        self.actor = None
        self.setup_learners()
        self.reset_state()
        batch = (validation.prompt_ids, validation.answers) if validation else None
        sampling = validation.sampling if validation else None
        self.actor = (
            ray.remote(ExtrapolatorActor)
            .options(num_cpus=0, max_concurrency=1)
            .remote(cfg, batch, sampling, verifier, reward_timeout_s, groups.bucket_mb)
        )
        tracker.log_json({"projected": self.selected, "not_projected": self.skipped}, "rl_extra/tensors.json")

    def setup_learners(self) -> None:
        """Give every learner rank its projector (at start, and after a learner group restart)."""
        s = self.cfg
        info = self.groups.call_learners(
            "extra_setup", list(s.include), s.exclude, s.anchor_device, s.velocity, s.monitor_samples
        )
        self.selected = sorted({n for i in info for n in i["selected"]})
        self.skipped = sorted({n for i in info for n in i["skipped"]})

    def reset_state(self) -> None:
        """Back to the first cycle (a learner group restarted from the initial weights)."""
        self.virtual_step = 0
        self.cycle = 0
        self.phase_run: str | None = None
        self.counters = {"projections_made": 0, "projections_skipped": 0, "projections_rolled_back": 0}
        self.records: list[dict] = []
        if self.actor is not None:
            import ray

            ray.get(self.actor.load_state.remote({"beta_max": ExtrapolationPolicy(self.cfg).beta_max}))

    # ------------------------------------------------------------------------------------------ the loop

    def before_step(self, step: int) -> None:
        first, last = (step - 1) % self.m == 0, step % self.m == 0
        if first:
            self.cycle += 1
            self.phase_run = self.tracker.start_phase(
                f"rl-phase-{self.cycle}", "rl_phase", {"cycle": self.cycle, "first_rl_step": step, "m": self.m}
            )
        if (first and self.cfg.anchor == "cycle_start") or (last and self.cfg.anchor == "previous_step"):
            self.groups.call_learners("extra_snapshot")

    def after_step(self, step: int, metrics: dict) -> dict:
        self.virtual_step += 1
        keep = ("train/reward_mean", "train/accuracy", "train/loss", "train/kl_behaviour", "time/step_s")
        self.tracker.log_phase_metrics(self.phase_run, {k: metrics[k] for k in keep}, step)
        out = {"virtual_step": self.virtual_step}
        if step % self.m == 0:
            self.tracker.end_phase(self.phase_run)
            self.phase_run = None
            if self.projects_after(step):
                out.update(self.extrapolate(step))
                out["virtual_step"] = self.virtual_step
        return out

    def projects_after(self, step: int) -> bool:
        """Does an extrapolation phase follow real step `step`? At each cycle's end, but not after the job's last
        real step: nothing would re-ground it (cycle 1 + m of the paper)."""
        return step % self.m == 0 and step != self.total_steps

    def extrapolate(self, step: int) -> dict:
        s, groups = self.cfg, self.groups
        run = self.tracker.start_phase(
            f"extrapolation-{self.cycle}",
            "extrapolation_phase",
            {
                "cycle": self.cycle,
                "beta_mode": s.beta_mode,
                "m": self.m,
                "n": s.n,
                "rl_step": step,
                "selection": s.selection,
                "velocity": s.velocity,
                "anchor": s.anchor,
                "tensors_eligible": len(self.selected),
            },
        )
        eval_before = self.evaluate() if s.eval_around_projection else None
        rec = self.run_phase()
        groups.weight_version = rec.weight_version
        self.counters[f"projections_{rec.outcome}"] += 1
        span = rec.steps_in_cycle if s.anchor == "cycle_start" else 1
        if rec.outcome == "made":
            self.virtual_step += round((rec.beta - 1.0) * span)
        eval_after = self.evaluate() if s.eval_around_projection and rec.outcome == "made" else eval_before
        result = phase_metrics(rec)
        if eval_before is not None:
            result["extra/eval_acc_before"] = eval_before["eval/avg_at_k"]
            result["extra/eval_acc_after"] = eval_after["eval/avg_at_k"]
        self.tracker.log_phase_metrics(run, {**result, "virtual_step": self.virtual_step}, step)
        record = {k: v for k, v in vars(rec).items() if k != "drift_share_per_tensor"}
        record.update(rl_step=step, virtual_step=self.virtual_step, eval_before=eval_before, eval_after=eval_after)
        self.records.append(record)
        self.tracker.log_json(
            {**record, "drift_share_per_tensor": rec.drift_share_per_tensor},
            f"rl_extra/extrapolation-{self.cycle}.json",
        )
        self.tracker.end_phase(run)
        what = {"made": f"projected with beta={rec.beta:.3g}", "skipped": "skipped", "rolled_back": "rolled back"}
        self.log(
            f"cycle {self.cycle} (rl_step {step}): {what[rec.outcome]}; drift share {rec.drift_share:.3f}, "
            f"R² median {rec.r2_median:.3f}, selected {rec.selected_frac:.1%}"
            + (f" — {'; '.join(rec.reasons)}" if rec.reasons else "")
        )
        return result

    def run_phase(self) -> ExtrapolationRecord:
        """One phase on the extrapolator actor; if a rollout engine died during it, restart it here and restore
        the phase-start weights (the phase counts as skipped)."""
        import ray

        g = self.groups
        try:
            return ray.get(self.actor.extrapolate.remote(self.cycle, g.learners, g.rollouts, g.weight_version))
        except Exception as exc:
            dead = g.dead_rollouts()
            if not dead:
                raise
            for i in dead:
                g.restart_rollout(i, exc, resync=False)
            # The engines may hold any version the phase reached: continue above all of them.
            g.weight_version = max(ray.get([r.get_weight_version.remote() for r in g.rollouts]) + [g.weight_version])
            g.call_learners("extra_rollback")
            g.sync_weights()
            return failed_phase_record(self.cycle, g.weight_version, exc)

    # ---------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        import ray

        return {
            "cycle": self.cycle,
            "virtual_step": self.virtual_step,
            "counters": dict(self.counters),
            "phase_run": self.phase_run,
            "policy": ray.get(self.actor.state.remote()),
            "records": self.records,
        }

    def load_state(self, state: dict) -> None:
        import ray

        self.cycle, self.virtual_step = int(state["cycle"]), int(state["virtual_step"])
        self.counters.update(state["counters"])
        self.phase_run = state.get("phase_run")
        self.records = list(state.get("records", []))
        ray.get(self.actor.load_state.remote(state["policy"]))
        if self.phase_run:
            self.tracker.reopen_phase(self.phase_run)

    def finish(self) -> None:
        """The job's last steps may form a partial cycle: close its RL phase run."""
        if self.phase_run:
            self.tracker.end_phase(self.phase_run)
            self.phase_run = None

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        finally:
            ray.kill(self.actor)


def phase_metrics(rec: ExtrapolationRecord) -> dict:
    """The extrapolation phase's MLflow metrics (NaN ones left out)."""
    result = {
        "extra/beta": rec.beta,
        "extra/beta_max": rec.beta_max,
        "extra/made": float(rec.outcome == "made"),
        "extra/rolled_back": float(rec.outcome == "rolled_back"),
        "extra/skipped": float(rec.outcome == "skipped"),
        "extra/drift_share": rec.drift_share,
        "extra/r2_median": rec.r2_median,
        "extra/r2_frac_above_0_7": rec.r2_frac_above_0_7,
        "extra/displacement_norm": rec.displacement_norm,
        "extra/selected_frac": rec.selected_frac,
        "extra/selected_tensors": rec.selected_tensors,
        "extra/projected_frac": rec.projected_frac,
        "extra/time_s": rec.time_s,
        "extra/val_reward_before": rec.val_reward_before,
        "extra/val_reward_after": rec.val_reward_after,
    }
    return {k: v for k, v in result.items() if v is None or not (isinstance(v, float) and math.isnan(v))}


def failed_phase_record(cycle: int, weight_version: int, exc: Exception) -> ExtrapolationRecord:
    """A phase that a dead rollout engine broke off: nothing applied."""
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    nan = math.nan
    return ExtrapolationRecord(
        cycle=cycle,
        outcome="skipped",
        beta=1.0,
        beta_max=nan,
        steps_in_cycle=0,
        drift_share=nan,
        r2_median=nan,
        r2_frac_above_0_7=nan,
        displacement_norm=nan,
        selected_frac=nan,
        selected_tensors=0,
        projected_numel=0,
        projected_frac=0.0,
        val_reward_before=None,
        val_reward_after=None,
        candidates={},
        reasons=[f"a rollout engine died during the phase ({reason}); restarted, phase-start weights restored"],
        optimizer_reset=False,
        weight_version=weight_version,
        time_s=nan,
    )
