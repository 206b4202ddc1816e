"""The extrapolator: decides, at the end of every RL-Extra cycle, whether, what and how far to move the weights.

`ExtrapolationPolicy` is the pure decision logic (no Ray): the coefficients to try, the linearity gate of `auto`,
the choice among validated candidates, the guards, the shrink after a rollback, and lookahead's entropy switch-off.
`ExtrapolatorActor` is the Ray actor that owns a policy and carries a decision out on the live job: it asks every
learner rank for the cycle's linearity statistics (`ShardProjector.end_cycle`), tells every rank to move its own
shard in place, scores candidates against not moving on a validation batch, and undoes what a guard rejects. It
returns an `ExtrapolationRecord`; the driver logs it (MLflow nested run + JSON artifact).

Every strategy moves the shards as W ← A + β (W − A) along its own direction (orchestrator/config.py
ScheduleConfig): `extrapolate` (the cycle's chord or least-squares slope on the selected elements, β > 1), `rank1`
(each matrix's rank-1 part of W − A, β > 1), `lookahead` (SFPO: A = the slow weights S, W the fast weights, β = α
< 1). "Not moving" — what candidates are tested against and what a rejected phase returns to — is the phase-start
weights for extrapolate / rank1 (`rollback`) and the slow weights S for lookahead (`restore_anchor`; the slow
correction step that follows is then a plain RL step). The rollout engines hold the not-moving weights during the
phase (lookahead's fast steps are never synced), so they sample the validation batch for every candidate.

β modes (`schedule.beta_mode`):
- `fixed`: `schedule.beta` (lookahead: `lookahead_alpha`);
- `schedule`: the paper's (m + n) / m for anchor `cycle_start`, 1 + n for `previous_step` (lookahead: α);
- `adaptive`: `candidates × β_max`, each tested against not moving (linearity/validation.py: the paired
  importance-sampled gain on the validation batch, a one-sided t-test at `validation_fpr` split over the
  candidates); the accepted one with the largest estimated gain is kept, none accepted: nothing is kept;
- `auto`: `adaptive`, and for extrapolate / rank1 only when the linearity monitor says the trajectory is linear
  enough: the drift share (cos of consecutive cycles' displacements; in the first cycle, of its two halves) ≥
  `monitor_threshold`, and the sampled median R² ≥ `monitor_r2` when set. Otherwise the cycle ends without a move
  and training goes on plainly — so `auto` keeps a move only when it is linear and a test whose false-positive rate
  is `validation_fpr` says it gains: when in doubt, it does not move.

SFPO, and where lookahead deviates from its code (linearity/lookahead.py describes it):
- the reposition runs on each rank's fp32 master shard in place (SFPO clones every parameter twice);
- one optimizer step per fast step: rlextra's RL step is one optimizer step over the batch (SFPO's `update_policy`
  runs ppo_mini_batch_size mini-batches, 4 steps at its 256/64), so K = `lookahead_steps` counts optimizer steps;
- α goes through the same validation and guards as every strategy (`fixed` / `schedule`: SFPO's fixed α with the
  NaN guard only); a rejected reposition returns to S instead of keeping the fast weights;
- the Adam moments keep the fast steps' updates also when the reposition is rejected (as SFPO's keep them always).

The actor holds no copy of the driver's actor groups: each call gets the live learner and rollout handles and the
current weight version, and returns the version it left the engines at. It never restarts an actor: a dead one fails
the call, and the driver restarts it and restores the not-moving weights.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from actors.groups import ActorGroups
from linearity.lookahead import EntropySwitch
from linearity.validation import PairedGain, paired_gain
from orchestrator.config import ScheduleConfig
from orchestrator.messages import TrainBatch, ValidationBatch


@dataclass
class Candidate:
    """One tried coefficient: whether the moved weights were finite, and its validation test (None: not validated)."""

    beta: float
    finite: bool
    test: PairedGain | None = None


@dataclass
class Decision:
    beta: float | None  # the β to keep, or None: do not move
    reasons: list[str] = field(default_factory=list)
    guard_fired: bool = False  # None because something went wrong (NaN/Inf, reward collapse), not for lack of gain


class ExtrapolationPolicy:
    """β state and decisions of RL-Extra; pure and picklable."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        self.beta_max = float(cfg.beta) if cfg.beta is not None else cfg.schedule_beta
        self.entropy = EntropySwitch(cfg.entropy_window, cfg.entropy_z)

    @property
    def lookahead(self) -> bool:
        return self.cfg.strategy == "lookahead"

    # ---------------------------------------------------------------------------------------------- gate

    def gate(self, drift_share: float, drift_share_halves: float, r2_median: float) -> tuple[bool, str]:
        """auto, extrapolate / rank1: is the trajectory linear enough to move? The drift share across cycles, or in
        the first cycle (NaN across cycles) that of its two halves. Other modes and lookahead: always."""
        if self.cfg.beta_mode != "auto" or self.lookahead:
            return True, ""
        share, what = drift_share, "drift share"
        if math.isnan(share):
            share, what = drift_share_halves, "drift share of the cycle's halves"
        if not share >= self.cfg.monitor_threshold:  # NaN (a one-step first cycle) fails too
            return False, f"{what} {share:.3f} < {self.cfg.monitor_threshold} (monitor)"
        if self.cfg.monitor_r2 is not None and not r2_median >= self.cfg.monitor_r2:
            return False, f"median sampled R² {r2_median:.3f} < {self.cfg.monitor_r2} (monitor)"
        return True, ""

    def betas(self) -> list[float]:
        """The coefficients to try this cycle: β > 1 (extrapolate, rank1), 0 < α ≤ 1 (lookahead)."""
        if self.cfg.beta_mode not in ("adaptive", "auto"):
            return [self.beta_max]
        tried = [self.beta_max * f for f in self.cfg.candidates]
        keep = [b for b in tried if (0.0 < b <= 1.0 if self.lookahead else b > 1.0)]
        return sorted({round(b, 6) for b in keep}) or [self.beta_max]

    # ---------------------------------------------------------------------------------------- decisions

    def choose(self, candidates: list[Candidate]) -> Decision:
        """Pick among tried candidates, applying the guards.

        adaptive / auto keep only a candidate its validation test accepted (the largest estimated gain; ties: the
        smaller step); fixed / schedule keep their single β unless its estimated reward change is below
        −`guard_margin`. Non-finite weights, or every candidate estimated below −`guard_margin`, fire a guard."""
        reasons = [f"beta={c.beta:.4g}: non-finite weights" for c in candidates if not c.finite]
        finite = [c for c in candidates if c.finite]
        if not finite:
            return Decision(None, reasons or ["no candidate"], guard_fired=True)
        if finite[0].test is None:  # no validation: the single β of fixed / schedule
            return Decision(finite[-1].beta, reasons)
        margin = self.cfg.guard_margin
        best = max(finite, key=lambda c: (c.test.gain, -c.beta))
        if margin is not None and best.test.gain < -margin:
            return Decision(
                None,
                reasons
                + [f"estimated reward change {best.test.gain:+.4f} at beta={best.beta:.4g} < -{margin}: rolled back"],
                guard_fired=True,
            )
        if self.cfg.beta_mode not in ("adaptive", "auto"):
            return Decision(best.beta, reasons + [f"beta={best.beta:.4g}: estimated {_describe(best.test)}"])
        accepted = [c for c in finite if c.test.accepted]
        if not accepted:
            return Decision(
                None,
                reasons
                + [
                    f"no candidate passed the validation test (best beta={best.beta:.4g}: {_describe(best.test)}); "
                    "did not move"
                ],
            )
        chosen = max(accepted, key=lambda c: (c.test.gain, -c.beta))
        return Decision(chosen.beta, reasons + [f"beta={chosen.beta:.4g}: {_describe(chosen.test)}"])

    def on_rollback(self) -> None:
        """After a guard fired: be more careful next cycle, β ← 1 + (β − 1) · shrink (lookahead: α ← α · shrink)."""
        if self.lookahead:
            self.beta_max *= self.cfg.shrink
        else:
            self.beta_max = 1.0 + (self.beta_max - 1.0) * self.cfg.shrink

    def observe_entropy(self, entropy: float) -> bool:
        """lookahead: one step's entropy; whether SFPO stays on for the next step (off for good after a spike)."""
        return self.entropy.observe(entropy)

    def state(self) -> dict:
        return {"beta_max": self.beta_max, "entropy": self.entropy.state()}

    def load_state(self, state: dict) -> None:
        self.beta_max = float(state["beta_max"])
        self.entropy.load_state(state["entropy"])


def _describe(test: PairedGain) -> str:
    verdict = "accepted" if test.accepted else "not significant"
    return f"gain {test.gain:+.4f}, t {test.t:.2f} vs {test.threshold:.2f} over {test.prompts} prompts, {verdict}"


@dataclass
class ExtrapolationRecord:
    """What one extrapolation phase did (returned to the driver, logged to MLflow)."""

    cycle: int
    strategy: str
    outcome: str  # made | skipped | rolled_back
    beta: float  # the coefficient kept: W = A + β (W − A); 1.0 when nothing moved (lookahead: 0.0, back to S)
    beta_max: float  # the policy's largest coefficient at the start of the phase
    steps_in_cycle: int
    drift_share: float
    drift_share_halves: float
    r2_median: float
    r2_frac_above_0_7: float
    displacement_norm: float
    selected_frac: float  # selected elements / elements the name globs allow
    selected_tensors: int
    projected_numel: int
    projected_frac: float  # projected elements / all elements of the partitions
    val_reward_before: float | None  # mean reward of the validation samples (at the not-moving weights)
    val_reward_after: float | None  # val_reward_before + the kept candidate's estimated gain
    val_gain: float | None  # the kept candidate's (else the best one's) estimated reward change
    val_t: float | None  # its t statistic
    candidates: dict[str, dict]  # per tried β: {finite, gain, t, threshold, accepted}
    reasons: list[str]
    optimizer_reset: bool
    weight_version: int
    time_s: float
    rank1_share: float = math.nan  # rank1: energy share of W − A along the rank-1 directions
    rank1_matrices: int = 0
    drift_share_per_tensor: dict[str, float] = field(default_factory=dict)


class ExtrapolatorActor:
    """Owns the policy; runs one extrapolation phase per call against the live learner and rollout actors."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        validation: ValidationBatch | None,
        verifier: str,
        reward_timeout_s: float,
        bucket_mb: float,
        weight_sync: str,
    ):
        """validation: the validation batch, or None when no scoring is needed; bucket_mb: the weight sync's."""
        from verifiers.pool import ScoringPool

        self.policy = ExtrapolationPolicy(cfg)
        self.cfg = cfg
        self.groups: ActorGroups | None = None  # this phase's view of the job's actors (handles, no restarts)
        self.validation = validation
        self.verifier = verifier
        self.bucket_mb = bucket_mb
        self.weight_sync = weight_sync  # rollout.weight_sync; a collective one uses the job's weight group as it is
        self.scorer = ScoringPool(max_workers=1, timeout_s=reward_timeout_s) if validation else None

    def state(self) -> dict:
        return self.policy.state()

    def load_state(self, state: dict) -> None:
        self.policy.load_state(state)

    def observe_entropy(self, entropy: float) -> bool:
        return self.policy.observe_entropy(entropy)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()

    # ----------------------------------------------------------------------------------------- pieces

    def sample_validation(self, cycle: int) -> tuple[TrainBatch, torch.Tensor, torch.Tensor]:
        """Validation responses from the engines (they hold the not-moving weights), seeded per cycle: the batch,
        each sample's prompt index long[N] and reward float64[N]."""
        v = self.validation
        result = self.groups.generate(v.prompt_ids, dataclasses.replace(v.sampling, seed=v.sampling.seed + cycle))
        rewards = self.scorer.score_batch(
            self.verifier, result.response_text, [v.answers[i] for i in result.prompt_index]
        )
        batch = TrainBatch.from_rollout(result, torch.zeros(len(rewards)), v.pad_id, v.sampling.temperature)
        return batch, torch.tensor(result.prompt_index), torch.tensor(rewards, dtype=torch.float64)

    def project(self, beta: float):
        return self.groups.call_learners("extra_project", beta)[0]

    def not_moving(self) -> None:
        """Back to the weights a rejected phase keeps: the phase start, or lookahead's slow weights."""
        self.groups.call_learners("extra_restore_anchor" if self.policy.lookahead else "extra_rollback")

    # ------------------------------------------------------------------------------------------ phase

    def extrapolate(self, cycle: int, learners: list, rollouts: list, weight_version: int) -> ExtrapolationRecord:
        """The end of cycle `cycle`: monitor, gate, try candidates, decide, keep or undo.

        learners / rollouts: the job's live actor handles; weight_version: what the engines hold now. The record's
        `weight_version` is what they hold after this phase (extrapolate / rank1 sync a kept move; lookahead's slow
        step and the job's sync follow)."""
        start = time.perf_counter()
        cfg, policy = self.cfg, self.policy
        self.groups = ActorGroups.of(rollouts, learners, weight_version, self.bucket_mb, self.weight_sync)
        self.groups.call_learners("extra_begin_phase")  # what every candidate starts from
        selection = cfg.selection if cfg.strategy == "extrapolate" else "names"
        per_rank = self.groups.call_learners(
            "extra_end_cycle", selection, cfg.selection_threshold, cfg.selection_fraction, cfg.rank1_iters
        )
        record = self._record(cycle, per_rank, policy.beta_max, weight_version)
        cs = per_rank[0]
        ok, why = policy.gate(cs.drift_share, cs.drift_share_halves, record.r2_median)
        if not ok or cs.selected_numel == 0:
            record.reasons.append(why or f"selection {selection!r} selected no element")
            if policy.lookahead:
                self.not_moving()
                record.beta = 0.0
            return self._finish(record, start)

        validation = None
        if cfg.needs_validation:
            batch, prompt_index, rewards = self.sample_validation(cycle)
            if policy.lookahead:  # the base is S, the learners hold the fast weights
                self.groups.call_learners("extra_restore_anchor")
                base = self.groups.sequence_logp(batch)
                self.groups.call_learners("extra_rollback")
            else:
                base = self.groups.sequence_logp(batch)
            validation = (batch, prompt_index, rewards, base)
            record.val_reward_before = float(rewards.mean())
        betas = policy.betas()
        level = cfg.validation_fpr / len(betas)  # Bonferroni: a phase keeps a null candidate with prob <= fpr
        tried: list[Candidate] = []
        stats = None
        for i, beta in enumerate(betas):
            if i:
                self.groups.call_learners("extra_rollback")  # every candidate starts from the same weights
            stats = self.project(beta)
            if not stats.finite:
                tried.append(Candidate(beta, False))
                continue
            test = None
            if validation is not None:
                batch, prompt_index, rewards, base = validation
                test = paired_gain(prompt_index, rewards, base, self.groups.sequence_logp(batch), level)
            tried.append(Candidate(beta, True, test))
        record.candidates = {f"{c.beta:.4g}": _candidate_json(c) for c in tried}
        record.projected_numel = stats.projected_numel  # what the projection touched (also when it is undone)
        record.projected_frac = stats.projected_numel / max(1, stats.total_numel)
        decision = policy.choose(tried)
        record.reasons += decision.reasons
        shown = next((c for c in tried if c.beta == decision.beta), None) or _best(tried)
        if shown is not None and shown.test is not None:
            record.val_gain, record.val_t = shown.test.gain, shown.test.t
        if decision.beta is None:
            self.not_moving()
            if not all(c.finite for c in tried) and not cfg.guard_nan:
                raise RuntimeError("RL-Extra: projection produced NaN/Inf and schedule.guard_nan is off")
            if decision.guard_fired:  # something went wrong: undone, and the next cycle tries a smaller β
                record.outcome = "rolled_back"
                policy.on_rollback()
            else:  # the validation test saw no significant gain over not moving: undone, β kept
                record.outcome = "skipped"
            record.beta = 0.0 if policy.lookahead else 1.0
            record.val_reward_after = record.val_reward_before
            return self._finish(record, start)
        if decision.beta != tried[-1].beta:  # the shards hold the last candidate: redo the chosen one
            self.groups.call_learners("extra_rollback")
            self.project(decision.beta)
        if not policy.lookahead:
            self.groups.sync_weights()
        if cfg.optimizer == "reset":
            self.groups.call_learners("extra_reset_optimizer")
            record.optimizer_reset = True
        record.outcome, record.beta = "made", decision.beta
        if record.val_reward_before is not None and record.val_gain is not None:
            record.val_reward_after = record.val_reward_before + record.val_gain
        return self._finish(record, start)

    def _record(self, cycle: int, per_rank: list, beta_max: float, weight_version: int) -> ExtrapolationRecord:
        cs = per_rank[0]
        r2 = [v for s in per_rank for v in s.r2_values]
        return ExtrapolationRecord(
            cycle=cycle,
            strategy=self.cfg.strategy,
            outcome="skipped",
            beta=1.0,
            beta_max=beta_max,
            steps_in_cycle=cs.steps,
            drift_share=cs.drift_share,
            drift_share_halves=cs.drift_share_halves,
            r2_median=statistics.median(r2) if r2 else math.nan,
            r2_frac_above_0_7=sum(v > 0.7 for v in r2) / len(r2) if r2 else math.nan,
            displacement_norm=cs.displacement_norm,
            selected_frac=cs.selected_numel / max(1, cs.eligible_numel),
            selected_tensors=cs.selected_tensors,
            projected_numel=0,
            projected_frac=0.0,
            val_reward_before=None,
            val_reward_after=None,
            val_gain=None,
            val_t=None,
            candidates={},
            reasons=[],
            optimizer_reset=False,
            weight_version=weight_version,
            time_s=0.0,
            rank1_share=cs.rank1_share,
            rank1_matrices=cs.rank1_matrices,
            drift_share_per_tensor=cs.drift_share_per_tensor,
        )

    def _finish(self, record: ExtrapolationRecord, start: float) -> ExtrapolationRecord:
        record.weight_version = self.groups.weight_version
        record.time_s = time.perf_counter() - start
        self.groups = None
        return record


def _best(tried: list[Candidate]) -> Candidate | None:
    tested = [c for c in tried if c.finite and c.test is not None]
    return max(tested, key=lambda c: (c.test.gain, -c.beta)) if tested else None


def _candidate_json(c: Candidate) -> dict:
    if c.test is None:
        return {"finite": c.finite}
    t = c.test
    return {"finite": c.finite, "gain": t.gain, "t": t.t, "threshold": t.threshold, "accepted": t.accepted}
