"""RL-Extra's driver side: cycles of m real RL steps, each ended by an extrapolation phase.

The `ExtrapolatorActor` (actors/extrapolator.py) decides and carries out each phase on the learners' shards; this
class keeps the schedule around the job's loop:

- anchors: every rank snapshots its shard at the cycle start (or one step before the cycle's end for
  `anchor=previous_step`);
- the step's learner work (`train`): one optimizer step; with `strategy=lookahead` (SFPO, while its entropy switch
  is on) K fast steps on the step's batch, the reposition phase, and the slow correction step — the phase runs inside
  the step, between the fast and the slow steps, and is logged when the step ends;
- counters: `virtual_step` (+ (β − 1) · span per projection made by extrapolate / rank1; lookahead skips no step)
  and the made / skipped / rolled-back counts;
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

from actors.extrapolator import ExtrapolationPolicy, ExtrapolationRecord, ExtrapolatorActor
from actors.groups import ActorGroups
from orchestrator.config import ScheduleConfig
from orchestrator.messages import TrainBatch, ValidationBatch
from orchestrator.tracking import Tracker


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
        self.lookahead = cfg.strategy == "lookahead"
        self.groups, self.tracker, self.evaluate, self.log = groups, tracker, evaluate, log
        self.selected: list[str] = []
        self.skipped: list[str] = []
        self.actor = None
        self.setup_learners()
        self.reset_state()
        self.actor = (
            ray.remote(ExtrapolatorActor)
            .options(num_cpus=0, max_concurrency=1)
            .remote(cfg, validation, verifier, reward_timeout_s, groups.bucket_mb, groups.weight_sync)
        )
        tracker.log_json({"projected": self.selected, "not_projected": self.skipped}, "rl_extra/tensors.json")

    def setup_learners(self) -> None:
        """Give every learner rank its projector (at start, and after a learner group restart)."""
        s = self.cfg
        # SFPO repositions every weight (norm layers too); the others exclude the norms unless told otherwise
        exclude = [] if self.lookahead and s.exclude is None else s.exclude
        half = s.m // 2 if s.anchor == "cycle_start" else 0  # the first cycle's halves, for auto's first gate
        info = self.groups.call_learners(
            "extra_setup", list(s.include), exclude, s.anchor_device, s.velocity, s.monitor_samples, s.strategy, half
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
        self.lookahead_on = self.lookahead  # SFPO until its entropy switch turns it off
        self.pending: tuple[ExtrapolationRecord, dict | None] | None = None  # lookahead: this step's phase
        if self.actor is not None:
            import ray

            ray.get(self.actor.load_state.remote(ExtrapolationPolicy(self.cfg).state()))

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

    def train(self, shards: list[TrainBatch], updates: int = 1) -> list:
        """The step's learner work; the last optimizer step's metrics per rank: `updates` passes over the batch
        (trainer.updates_per_batch), or, lookahead while on (which takes updates = 1): K fast steps on the batch,
        the reposition phase (kept for `after_step` to log), the slow correction step."""
        if not self.lookahead_on:
            return self.groups.train_step(shards, updates=updates)
        for _ in range(self.cfg.lookahead_steps):
            self.groups.train_step(shards, fast=True)
        eval_before = self.evaluate() if self.cfg.eval_around_projection else None  # the engines hold S
        self.pending = (self.run_phase(), eval_before)
        return self.groups.train_step(shards)

    def after_step(self, step: int, metrics: dict) -> dict:
        self.virtual_step += 1
        keep = ("train/reward_mean", "train/accuracy", "train/loss", "train/kl_behaviour", "time/step_s")
        self.tracker.log_phase_metrics(self.phase_run, {k: metrics[k] for k in keep}, step)
        out = {"virtual_step": self.virtual_step}
        if step % self.m == 0:
            self.tracker.end_phase(self.phase_run)
            self.phase_run = None
            if self.lookahead:
                if self.pending is not None:
                    out.update(self.log_phase(step, *self.pending))
                    self.pending = None
                if self.lookahead_on:
                    import ray

                    self.lookahead_on = ray.get(self.actor.observe_entropy.remote(metrics["train/entropy"]))
                    if not self.lookahead_on:
                        self.log(f"rl_step {step}: entropy spike (z >= {self.cfg.entropy_z}): lookahead off for good")
            elif self.projects_after(step):
                eval_before = self.evaluate() if self.cfg.eval_around_projection else None
                out.update(self.log_phase(step, self.run_phase(), eval_before))
            out["virtual_step"] = self.virtual_step
        return out

    def projects_after(self, step: int) -> bool:
        """Does a projection phase follow real step `step` (extrapolate, rank1)? At each cycle's end, but not after the
        job's last real step: nothing would re-ground it (cycle 1 + m of the paper). Lookahead's phases are inside
        its steps (`train`)."""
        return not self.lookahead and step % self.m == 0 and step != self.total_steps

    def log_phase(self, step: int, rec: ExtrapolationRecord, eval_before: dict | None) -> dict:
        """Count, log (MLflow nested run, JSON artifact, console) and return the metrics of one phase."""
        s = self.cfg
        run = self.tracker.start_phase(
            f"extrapolation-{self.cycle}",
            "extrapolation_phase",
            {
                "cycle": self.cycle,
                "strategy": s.strategy,
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
        self.counters[f"projections_{rec.outcome}"] += 1
        span = rec.steps_in_cycle if s.anchor == "cycle_start" else 1
        if rec.outcome == "made" and not self.lookahead:
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
        what = {"made": f"moved with beta={rec.beta:.3g}", "skipped": "skipped", "rolled_back": "rolled back"}
        self.log(
            f"cycle {self.cycle} (rl_step {step}): {what[rec.outcome]} ({rec.strategy}); drift share "
            f"{rec.drift_share:.3f} (halves {rec.drift_share_halves:.3f}), R² median {rec.r2_median:.3f}, "
            f"selected {rec.selected_frac:.1%}" + (f" — {'; '.join(rec.reasons)}" if rec.reasons else "")
        )
        return result

    def run_phase(self) -> ExtrapolationRecord:
        """One phase on the extrapolator actor (the groups then know the engines' weight version); if a rollout
        engine died during it, restart it here and restore the weights of not moving (the phase counts as skipped)."""
        import ray

        g = self.groups
        try:
            rec = ray.get(self.actor.extrapolate.remote(self.cycle, g.learners, g.rollouts, g.weight_version))
            g.weight_version = rec.weight_version
            return rec
        except Exception as exc:
            dead = g.dead_rollouts()
            if not dead:
                raise
            for i in dead:
                g.restart_rollout(i, exc, resync=False)
            # The engines may hold any version the phase reached: continue above all of them.
            g.weight_version = max(ray.get([r.get_weight_version.remote() for r in g.rollouts]) + [g.weight_version])
            g.call_learners("extra_restore_anchor" if self.lookahead else "extra_rollback")
            g.sync_weights()
            return failed_phase_record(self.cycle, self.cfg.strategy, g.weight_version, exc)

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
        self.lookahead_on = self.lookahead and bool(state["policy"]["entropy"]["on"])
        self.pending = None  # a phase of a step that did not finish is replayed, not logged
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
        "extra/drift_share_halves": rec.drift_share_halves,
        "extra/rank1_share": rec.rank1_share,
        "extra/val_gain": rec.val_gain,
        "extra/val_t": rec.val_t,
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
    return {k: v for k, v in result.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def failed_phase_record(cycle: int, strategy: str, weight_version: int, exc: Exception) -> ExtrapolationRecord:
    """A phase that a dead rollout engine broke off: nothing applied."""
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    nan = math.nan
    return ExtrapolationRecord(
        cycle=cycle,
        strategy=strategy,
        outcome="skipped",
        beta=0.0 if strategy == "lookahead" else 1.0,
        beta_max=nan,
        steps_in_cycle=0,
        drift_share=nan,
        drift_share_halves=nan,
        r2_median=nan,
        r2_frac_above_0_7=nan,
        displacement_norm=nan,
        selected_frac=nan,
        selected_tensors=0,
        projected_numel=0,
        projected_frac=0.0,
        val_reward_before=None,
        val_reward_after=None,
        val_gain=None,
        val_t=None,
        candidates={},
        reasons=[f"a rollout engine died during the phase ({reason}); restarted, phase-start weights restored"],
        optimizer_reset=False,
        weight_version=weight_version,
        time_s=nan,
    )
