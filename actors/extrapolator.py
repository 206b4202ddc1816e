"""The extrapolator: decides, at the end of every RL-Extra cycle, whether, what and how far to project.

`ExtrapolationPolicy` is the pure decision logic (no Ray): β candidates, the linearity gate of `auto`, the
choice among scored candidates, the guards and the β shrink after a rollback. `ExtrapolatorActor` is the Ray
actor that owns a policy and carries a decision out on the live job: it asks every learner rank for the
cycle's linearity statistics (`ShardProjector.end_cycle`), tells every rank to project its own shard in place,
pushes the projected weights to the rollout engines through the normal sync path, scores candidates on a fixed
validation batch through those engines, and rolls the shards back when a guard fires. It returns an
`ExtrapolationRecord`; the driver logs it (MLflow nested run + JSON artifact).

β modes (`schedule.beta_mode`, orchestrator/config.py ScheduleConfig):
- `fixed`: `schedule.beta`;
- `schedule`: the paper's (m + n) / m for anchor `cycle_start`, 1 + n for `previous_step` (one step's
  displacement stretched over n more);
- `adaptive`: a line search over `candidates × β_max`, scored by validation reward; the best is kept only if it
  beats not projecting (β = 1);
- `auto`: `adaptive`, but only when the linearity monitor says the trajectory is linear enough (drift share ≥
  `monitor_threshold`, and the sampled median R² ≥ `monitor_r2` when set); otherwise the cycle ends without a
  projection and training goes on plainly — so `auto` cannot do worse than RL at equal real steps by more than
  what the validation batch fails to see.

The actor holds no copy of the driver's actor groups: each call gets the live learner and rollout handles and the
current weight version, and returns the version it left the engines at. It never restarts an actor: a dead one fails
the call, and the driver restarts it and restores the phase-start weights (`ShardProjector.begin_phase`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from actors.groups import ActorGroups
from orchestrator.config import ScheduleConfig


@dataclass
class Decision:
    beta: float | None  # the β to keep, or None: leave the weights unprojected
    reasons: list[str] = field(default_factory=list)
    guard_fired: bool = False  # None because something went wrong (NaN/Inf, reward collapse), not for lack of gain


class ExtrapolationPolicy:
    """β state and decisions of RL-Extra; pure and picklable."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        self.beta_max = float(cfg.beta) if cfg.beta is not None else cfg.schedule_beta

    # ---------------------------------------------------------------------------------------------- gate

    def gate(self, drift_share: float, r2_median: float) -> tuple[bool, str]:
        """auto: is the trajectory linear enough to project? (other modes always project)"""
        if self.cfg.beta_mode != "auto":
            return True, ""
        if not drift_share >= self.cfg.monitor_threshold:  # NaN (first cycle) fails too
            return False, f"drift share {drift_share:.3f} < {self.cfg.monitor_threshold} (monitor)"
        if self.cfg.monitor_r2 is not None and not r2_median >= self.cfg.monitor_r2:
            return False, f"median sampled R² {r2_median:.3f} < {self.cfg.monitor_r2} (monitor)"
        return True, ""

    def betas(self) -> list[float]:
        """The β values to try this cycle (each > 1)."""
        if self.cfg.beta_mode in ("adaptive", "auto"):
            out = sorted({round(self.beta_max * f, 6) for f in self.cfg.candidates if self.beta_max * f > 1.0})
            return out or [self.beta_max]
        return [self.beta_max]

    # ---------------------------------------------------------------------------------------- decisions

    def choose(self, before: float | None, tried: dict[float, float]) -> Decision:
        """Pick among tried β (validation reward per β; -inf = non-finite weights), applying the guards.

        Never returns a β whose validation reward is not above `before` (the reward at β = 1) in adaptive / auto,
        nor one more than `guard_margin` below it in any mode."""
        reasons = [f"beta={b:.4g}: non-finite weights" for b, r in tried.items() if r == -math.inf]
        finite = {b: r for b, r in tried.items() if r != -math.inf}
        if not finite:
            return Decision(None, reasons or ["no candidate"], guard_fired=True)
        if before is None:  # no validation: the single β of fixed / schedule
            return Decision(max(finite), reasons)
        best = max(finite, key=lambda b: (finite[b], -b))  # ties: the smaller step
        if self.cfg.beta_mode in ("adaptive", "auto") and not finite[best] > before:
            return Decision(
                None,
                reasons
                + [
                    f"no candidate beat beta=1 ({before:.3f} vs best "
                    f"{finite[best]:.3f} at beta={best:.4g}); kept the unprojected weights"
                ],
            )
        if self.cfg.guard_margin is not None and finite[best] < before - self.cfg.guard_margin:
            return Decision(
                None,
                reasons
                + [f"validation reward {finite[best]:.3f} < {before:.3f} - {self.cfg.guard_margin}: rolled back"],
                guard_fired=True,
            )
        return Decision(best, reasons)

    def on_rollback(self) -> None:
        """After a guard fired: be more careful next cycle, β ← 1 + (β − 1) · shrink."""
        self.beta_max = 1.0 + (self.beta_max - 1.0) * self.cfg.shrink

    def state(self) -> dict:
        return {"beta_max": self.beta_max}

    def load_state(self, state: dict) -> None:
        self.beta_max = float(state["beta_max"])


@dataclass
class ExtrapolationRecord:
    """What one extrapolation phase did (returned to the driver, logged to MLflow)."""

    cycle: int
    outcome: str  # made | skipped | rolled_back
    beta: float  # the β applied (1.0 when nothing was applied)
    beta_max: float  # the policy's β_max at the start of the phase
    steps_in_cycle: int
    drift_share: float
    r2_median: float
    r2_frac_above_0_7: float
    displacement_norm: float
    selected_frac: float  # selected elements / elements the name globs allow
    selected_tensors: int
    projected_numel: int
    projected_frac: float  # projected elements / all elements of the partitions
    val_reward_before: float | None
    val_reward_after: float | None
    candidates: dict[str, float]
    reasons: list[str]
    optimizer_reset: bool
    weight_version: int
    time_s: float
    drift_share_per_tensor: dict[str, float] = field(default_factory=dict)


class ExtrapolatorActor:
    """Owns the policy; runs one extrapolation phase per call against the live learner and rollout actors."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        validation: tuple | None,
        sampling,
        verifier: str,
        reward_timeout_s: float,
        bucket_mb: float,
        weight_sync: str,
    ):
        """
        validation: (prompt ids, answers) of the fixed validation batch, or None when no scoring is needed.
        sampling: `SamplingConfig` for validation rollouts (fixed seed: candidates see the same randomness).
        """
        from verifiers.pool import ScoringPool

        self.policy = ExtrapolationPolicy(cfg)
        self.cfg = cfg
        self.groups: ActorGroups | None = None  # this phase's view of the job's actors (handles, no restarts)
        self.validation = validation
        self.sampling = sampling
        self.verifier = verifier
        self.bucket_mb = bucket_mb
        self.weight_sync = weight_sync  # rollout.weight_sync; a collective one uses the job's weight group as it is
        self.scorer = ScoringPool(max_workers=1, timeout_s=reward_timeout_s) if validation else None

    def state(self) -> dict:
        return self.policy.state()

    def load_state(self, state: dict) -> None:
        self.policy.load_state(state)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()

    # ----------------------------------------------------------------------------------------- pieces

    def validation_reward(self) -> float:
        prompts, answers = self.validation
        result = self.groups.generate(prompts, self.sampling)
        scores = self.scorer.score_batch(self.verifier, result.response_text, [answers[i] for i in result.prompt_index])
        return sum(scores) / len(scores)

    def _project(self, beta: float):
        stats = self.groups.call_learners("extra_project", beta)[0]
        if stats.finite:
            self.groups.sync_weights()
        return stats

    def _rollback_and_sync(self) -> None:
        self.groups.call_learners("extra_rollback")
        self.groups.sync_weights()

    # ------------------------------------------------------------------------------------------ phase

    def extrapolate(self, cycle: int, learners: list, rollouts: list, weight_version: int) -> ExtrapolationRecord:
        """The end of cycle `cycle`: monitor, gate, try candidates, decide, apply or roll back.

        learners / rollouts: the job's live actor handles; weight_version: what the engines hold now. The record's
        `weight_version` is what they hold after this phase."""
        start = time.perf_counter()
        cfg, policy = self.cfg, self.policy
        self.groups = ActorGroups.of(rollouts, learners, weight_version, self.bucket_mb, self.weight_sync)
        self.groups.call_learners("extra_begin_phase")  # what a failed phase is restored to
        beta_max = policy.beta_max
        per_rank = self.groups.call_learners(
            "extra_end_cycle", cfg.selection, cfg.selection_threshold, cfg.selection_fraction
        )
        cs = per_rank[0]
        r2 = [v for s in per_rank for v in s.r2_values]
        r2_median = statistics.median(r2) if r2 else math.nan
        r2_above = sum(v > 0.7 for v in r2) / len(r2) if r2 else math.nan
        record = ExtrapolationRecord(
            cycle=cycle,
            outcome="skipped",
            beta=1.0,
            beta_max=beta_max,
            steps_in_cycle=cs.steps,
            drift_share=cs.drift_share,
            r2_median=r2_median,
            r2_frac_above_0_7=r2_above,
            displacement_norm=cs.displacement_norm,
            selected_frac=cs.selected_numel / max(1, cs.eligible_numel),
            selected_tensors=cs.selected_tensors,
            projected_numel=0,
            projected_frac=0.0,
            val_reward_before=None,
            val_reward_after=None,
            candidates={},
            reasons=[],
            optimizer_reset=False,
            weight_version=weight_version,
            time_s=0.0,
            drift_share_per_tensor=cs.drift_share_per_tensor,
        )
        ok, why = policy.gate(cs.drift_share, r2_median)
        if not ok or cs.selected_numel == 0:
            record.reasons.append(why or f"selection {cfg.selection!r} selected no element")
            return self._finish(record, start)
        before = self.validation_reward() if cfg.needs_validation else None
        record.val_reward_before = before
        tried, stats = {}, None
        for i, beta in enumerate(policy.betas()):
            if i:
                self.groups.call_learners("extra_rollback")  # every candidate starts from the same weights
            stats = self._project(beta)
            if not stats.finite:
                tried[beta] = -math.inf
                continue
            tried[beta] = self.validation_reward() if before is not None else math.nan
        record.candidates = {f"{b:.4g}": r for b, r in tried.items()}
        record.projected_numel = stats.projected_numel  # what the projection touched (also when it is undone)
        record.projected_frac = stats.projected_numel / max(1, stats.total_numel)
        decision = policy.choose(before, tried)
        record.reasons += decision.reasons
        if decision.beta is None:
            self._rollback_and_sync()
            if any(r == -math.inf for r in tried.values()) and not cfg.guard_nan:
                raise RuntimeError("RL-Extra: projection produced NaN/Inf and schedule.guard_nan is off")
            if decision.guard_fired:  # something went wrong: undone, and the next cycle tries a smaller β
                record.outcome = "rolled_back"
                policy.on_rollback()
            else:  # validation saw no gain over β = 1 (often a tie on a small batch): undone, β kept
                record.outcome = "skipped"
            record.val_reward_after = before
            return self._finish(record, start)
        if decision.beta != list(tried)[-1]:  # the shards hold the last candidate: redo the chosen one
            self.groups.call_learners("extra_rollback")
            stats = self._project(decision.beta)
        if cfg.optimizer == "reset":
            self.groups.call_learners("extra_reset_optimizer")
            record.optimizer_reset = True
        record.outcome, record.beta = "made", decision.beta
        record.val_reward_after = tried[decision.beta] if before is not None else None
        return self._finish(record, start)

    def _finish(self, record: ExtrapolationRecord, start: float) -> ExtrapolationRecord:
        record.weight_version = self.groups.weight_version
        record.time_s = time.perf_counter() - start
        self.groups = None
        return record
