"""Step savings that hold up: real RL steps to a target accuracy, RL-Extra strategies against GRPO at its best.

    python bench/step_savings.py                                   # the default protocol (<= 60 min, quiet 2 cores)
    python bench/step_savings.py --task toy_mul --tune-seeds 10 --seeds 11 12 13
    python bench/step_savings.py --strategies lookahead-k1 lookahead-k3 lookahead-k5 lookahead-k3-a0.6 lookahead-k3-a1
    python bench/step_savings.py --strategies lookahead-k3 --grpo-updates 1 2 4 --grpo-lrs 1e-4 2e-4 4e-4
    python bench/step_savings.py --task toy_add data.toy.digits=3 --steps 40 --strategies extra-m5n15-top5
    python bench/step_savings.py --steps 20 --tune-seeds 0 --seeds 1 2 3 --grpo-lrs 2e-4 --strategy-lrs 2e-4
    python bench/step_savings.py --report-only                     # the same report again, from the stored runs

The protocol (its arithmetic is bench/savings.py, unit-tested in tests/test_step_savings.py):
1. Tuning, on --tune-seeds only. GRPO's lr grid (--grpo-lrs) grows by a factor 2 beyond its open edge until its best
   stable lr is bracketed: the lrs on both sides of it are worse or unstable (at most --max-extensions added lrs;
   the grid and why it stopped are reported). Score of an lr: the median over the tuning seeds of the mean accuracy
   gain over the warm start across the budget (the gain area ÷ budget): continuous and target-free, it rewards
   getting high early and staying there; steps-to-target ties too often on an m-step eval grid to bracket anything,
   and the target is itself defined by GRPO-best. Unstable: a non-finite loss, or a final accuracy more than
   --unstable-drop below the run's best eval. GRPO's second knob is μ, its optimizer steps per rollout batch
   (`trainer.updates_per_batch`: TRL's num_iterations, verl's ppo_epochs; SFPO's GRPO takes 4 mini-batch steps a
   batch): every μ of --grpo-updates gets its own bracketed lr grid, and the μ grid doubles beyond its top while its
   largest μ scores best (μ = 1 closes the low side; a single μ is fixed, and reported as a deviation). The best
   (μ, lr) is GRPO-best; every strategy's lr is tuned like GRPO's (--strategy-lrs). Then the headline strategy is
   chosen: the largest median step ratio vs GRPO-best on the tuning seeds (with the tuning seeds' own target), ties
   broken by gain area.
2. Report, on --seeds (>= 3, disjoint from the tuning seeds): GRPO-best, every strategy at its tuned lr, and GRPO at
   each strategy's lr (with GRPO-best's μ). Nothing is chosen here. A seed's target is 90 % of the way from its
   warm-start accuracy (its step-0 eval; each seed has its own warm start) to GRPO-best's median final accuracy over
   the report seeds.
3. Headline `value`: the median over report seeds of GRPO-best's real steps to the target ÷ the chosen strategy's.
   An arm that never reaches the target is censored at the budget: its ratio is a bound (savings.ratio_bounds) and
   enters the median as one (`value` is the median of the lower ends, `value_upper` of the upper ends, `value_kind`
   says which). Beside it: `same_lr_ratio` (vs GRPO at the strategy's own lr: the paper's claim), `auc_ratio`
   (gain areas over real steps), `final_acc_delta` (at the budget), `ends_below_grpo_best` (the report seeds where
   it ends more than one eval standard error below GRPO-best: savings.ends_below), `wall_ratio` (compute seconds to
   the target), `cycle_overhead_frac` (extrapolation-phase seconds ÷ RL-step seconds).

Cadence and budget: every arm is evaluated every c real steps on the same held-out eval set (--eval-prompts; the
toy task's eval split is disjoint from its RL split; toy_skills' also from its warm start's data, while toy_add's warm
start has seen every eval prompt: README, RL-Extra), c = the gcd of the strategies' cycle lengths m, and RL-Extra
arms also around every extrapolation phase (`schedule.eval_around_projection`: an eval before the phase, and one
after it when it projected; the job's own periodic eval at a cycle boundary would re-evaluate the post-projection
weights, so RL-Extra arms set `trainer.eval_every` only when c < m). The budget is at least 8 × the latest step at
which a strategy's first projection can be evaluated (m: `auto` gates its first cycle on the cycle's two halves; a
smaller --steps is reported as a deviation); the default is 120 real steps on the default task, toy_skills, where
GRPO rises over 50 to 150 steps (bench/task_curves.py). toy_add saturates within ~40 (--task toy_add --steps 40).
Lookahead (SFPO) repositions inside every real step: it is evaluated on the same cadence as GRPO, not around each
phase.
Compute seconds (wall_ratio, the plot's time axis) count RL steps (`time/step_s`) and extrapolation phases (each
record's `time_s`), not evals nor actor start-up.

Runs share one Ray and this process; each starts its own actors (orchestrator.train.run_job) and is stored in MLflow
(--db, experiment `bench-step-savings`), tagged with the code version (the last commit touching the code, plus a
hash of uncommitted changes to it), the session's settings and its run key: the version of the training code
(TRAIN_CODE_PATHS) and the run's overrides. A stored run of the same key is the same run, and every session reuses it
rather than train it again (an interrupted session resumes; a session that adds a μ or a seed trains only those);
--fresh retrains. The JSON's `timing.reused` counts the runs taken from other sessions. A commit to the training code
changes every key: `--adopt SESSION` retrains the cheapest of that session's runs and, when its eval curve is the
stored one to the digit, keys the session's runs to today's training code (runs reproduce on one machine, not across
CPUs); sessions holding the same run are checked against one retrain, and `--adopt stale` names every stored session
that holds runs of this session's arms under older keys. --report-only replays the protocol on stored runs only, and
refuses with one line when one is not there.

Output: the tuning grids, a per-strategy table, docs/img/step_savings.png (per strategy: mean and range over the
report seeds vs real steps and vs compute seconds, with GRPO-best and GRPO at the same lr), then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import RESULTS, ROOT, code_version, emit, run_overrides
from savings import (
    Bound,
    Cost,
    Grid,
    LrScore,
    Phase,
    Point,
    area_ratio,
    bracket_updates,
    build_curve,
    ends_below,
    finite_or_none,
    first_hit,
    gain_area,
    grow_grid,
    is_unstable,
    median_bounds,
    ratio_bounds,
    target_acc,
)


def lookahead_row(fast_steps: int, alpha: float) -> list[str]:
    """SFPO's overrides with K = `fast_steps` fast optimizer steps per rollout batch and reposition coefficient α."""
    return [
        "schedule=rl_extra",
        "schedule.strategy=lookahead",
        "schedule.m=1",
        "schedule.beta_mode=fixed",
        f"schedule.lookahead_steps={fast_steps}",
        f"schedule.lookahead_alpha={alpha}",
    ]


def top5_row(beta_mode: str) -> list[str]:
    """RL-Extra's projection at m = 5, n = 15 on the top 5 % of elements by steady displacement, with β chosen by
    `beta_mode` (`schedule`: (m + n) / m = 4 every cycle; `auto`: monitor gate + validation line search)."""
    return [
        "schedule=rl_extra",
        "schedule.m=5",
        "schedule.n=15",
        f"schedule.beta_mode={beta_mode}",
        "schedule.selection=top_elements",
        "schedule.selection_fraction=0.05",
    ]


# The arms. GRPO is plain RL, one arm per μ (optimizer steps per rollout batch). Each strategy row is (name,
# overrides): one row per strategy setting, tuning picks each row's lr and then one row.
GRPO = "grpo"
GRPO_OVERRIDES = ["schedule=rl"]


def grpo_arm(updates: int) -> str:
    """GRPO's arm at μ = `updates` optimizer steps per rollout batch: `grpo` (the plain loop) or `grpo-u{μ}`."""
    return GRPO if updates == 1 else f"{GRPO}-u{updates}"


def grpo_updates_of(arm: str) -> int | None:
    """The μ of a GRPO arm; None for a strategy row."""
    if arm == GRPO:
        return 1
    prefix = f"{GRPO}-u"
    return int(arm[len(prefix) :]) if arm.startswith(prefix) and arm[len(prefix) :].isdigit() else None


def grpo_row(updates: int) -> list[str]:
    return [*GRPO_OVERRIDES, f"trainer.updates_per_batch={updates}"] if updates > 1 else GRPO_OVERRIDES


STRATEGIES = {
    # the paper's projection, β = (m + n) / m = 4 every cycle, on the top 5 % of elements by steady displacement
    "extra-m5n15-top5": top5_row("schedule"),
    # schedule=rl_extra's auto policy: monitor gate + validation line search over β ∈ {2, 4}, same selection
    "auto-m5n15-top5": top5_row("auto"),
    # `auto` on top of GRPO at 8 optimizer steps a rollout batch (cycles count RL steps, the projector sees each step's
    # last pass; not in the default run). Measured (code c0d9854, README): it never projects — the drift share stays
    # under the monitor's 0.7 in every cycle — so it is GRPO at μ = 8 to the digit
    "auto-m5n15-top5-u8": [*top5_row("auto"), "trainer.updates_per_batch=8"],
    # AlphaRL / RELEX: every matrix moved along the rank-1 direction of its cycle update, stretched by β = 4
    "rank1-m5n15": [
        "schedule=rl_extra",
        "schedule.strategy=rank1",
        "schedule.m=5",
        "schedule.n=15",
        "schedule.beta_mode=schedule",
    ],
    # SFPO: 3 fast steps per rollout batch, reposition W ← S + 0.8 (W − S), one slow correction (its defaults; the
    # job's default schedule, conf/schedule/lookahead.yaml)
    "lookahead-k3": lookahead_row(3, 0.8),
    # SFPO's two knobs bracketed around its defaults (not in the default run: `--strategies` names them): fewer and
    # more fast steps, a stronger and no pull-back. α = 1 keeps the fast weights, so every rollout batch gets K + 1
    # plain optimizer steps (PPO epochs on one batch, until the entropy switch): the control that says whether the
    # reposition itself does anything.
    "lookahead-k1": lookahead_row(1, 0.8),
    "lookahead-k5": lookahead_row(5, 0.8),
    "lookahead-k3-a0.6": lookahead_row(3, 0.6),
    "lookahead-k3-a1": lookahead_row(3, 1.0),
    # SFPO with as many optimizer steps a rollout batch as GRPO-best takes (μ = 16: 15 fast + 1 slow): whether the
    # reposition still pays once GRPO reuses each batch that often
    "lookahead-k15": lookahead_row(15, 0.8),
}
DEFAULT_STRATEGIES = ("extra-m5n15-top5", "auto-m5n15-top5", "rank1-m5n15", "lookahead-k3", "lookahead-k15")
EXTRA_OVERRIDES = ["schedule.eval_around_projection=true"]  # after a skipping row's own: every phase is evaluated
# What the protocol sets for every run: a --task override may not touch these.
PROTOCOL_KEYS = ("seed", "learner.lr", "schedule", "tracking", "model.cache_dir") + tuple(
    f"trainer.{k}" for k in ("total_steps", "eval_every", "eval_prompts", "output_dir", "resume", "save_final")
)
DEFAULT_EVAL_EVERY = 5  # the cadence when no chosen strategy skips steps (lookahead alone)
BUDGET_FACTOR = 8  # budget >= this × the latest first-projection step: the largest ratio the protocol can measure
# The default task is toy_skills: its warm start never sees an eval prompt and is rebuilt when its procedures fail a
# check, so every seed's is usable (toy_add breaks both: README, RL-Extra). Its GRPO rises over 50 (lr 4e-4) to 150
# (1e-4) steps, so the default budget is 120 real steps, never less than BUDGET_FACTOR × the latest first projection.
DEFAULT_TASK, DEFAULT_BUDGET = "toy_skills", 120
MIN_REPORT_SEEDS, MIN_EVAL_PROMPTS = 3, 500
EXPERIMENT = "bench-step-savings"
# What a run's result depends on besides its overrides: the job's code, not the protocol's report arithmetic. A stored
# run of the same training code and the same overrides is the same run: sessions reuse it (--fresh retrains).
TRAIN_CODE_PATHS = ("orchestrator", "actors", "linearity", "verifiers", "conf", "pyproject.toml", "bench/common.py")

# Seconds per piece of a run of the default task (toy_skills: tiny model, 16 prompts × 8 samples per step, Avg@4 on
# 500 eval prompts) on a quiet 2-core machine, for the up-front estimate: from the default run at code ff6fad2 (its
# JSON `timing`: set-up 11.9 s median, RL step 0.245 s mean, 40 s of evals per 120-step GRPO run of 25 evals) and a
# 2000-step toy_skills warm start in ~2.5 min. The estimate counts GRPO at every strategy's lr as a run of its own, so
# it runs high: 69 min estimated for that session, 53 measured. toy_add's steps are slower (0.39 s).
# "pass": an optimizer step beyond a real step's first (GRPO's μ > 1, lookahead's fast steps): 0.16 s of learning a
# pass on an AMD EPYC 2-core machine (code d019e93, `time/learn_s` of GRPO at μ = 1 / 2 / 4 / 8: 0.19 / 0.40 / 0.65 /
# 1.43 s a step), where a whole μ = 1 step takes 0.37 s against 0.25 above: the estimate runs low on that machine.
COST_S = {"setup": 12.0, "step": 0.25, "pass": 0.16, "eval": 1.4, "phase": 0.1, "warm_start": 150.0}


class BenchError(Exception):
    """Bad input, or stored runs that do not match: one line on stderr, exit code 2."""


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything that determines a session's runs and report; stored with every run."""

    task: tuple[str, ...]  # the task variant: a data preset name (toy_mul) or overrides (data.toy.digits=3, model...)
    tune_seeds: tuple[int, ...]
    seeds: tuple[int, ...]  # report seeds
    strategies: dict[str, list[str]]  # name → overrides: the rows of STRATEGIES in use
    grpo_updates: tuple[int, ...]  # GRPO's initial μ grid (optimizer steps per rollout batch; a bracket adds to it)
    grpo_lrs: tuple[float, ...]  # the initial lr grids: GRPO's (for every μ), every strategy's (brackets add to them)
    strategy_lrs: tuple[float, ...]
    steps: int  # the budget in real RL steps, every arm
    eval_every: int  # c: every arm is evaluated every c real steps (and RL-Extra arms around every phase)
    eval_prompts: int
    max_extensions: int
    unstable_drop: float
    target_fraction: float
    code: str  # code_version(): the bench's code with the job's
    train_code: str  # code_version(TRAIN_CODE_PATHS): a run's identity, with its overrides (run_key)

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """The settings, what they imply per strategy, and where they fall short of the protocol."""

    settings: Settings
    cycles: dict[str, int]  # strategy → its cycle length m (the strategies whose phases stand for skipped steps)
    passes: dict[str, int]  # strategy → optimizer steps per real step (lookahead: K fast + 1 slow; else its μ)
    deviations: list[str]  # reported with the result, not refused: small settings test the machinery
    cache_dir: Path  # warm starts and toy data (content-keyed: not a setting)


def task_overrides(task: tuple[str, ...]) -> list[str]:
    """`toy_mul` → `data=toy_mul`; `data.toy.digits=3` stays as it is."""
    return [word if "=" in word else f"data={word}" for word in task]


def skips_steps(row: list[str]) -> bool:
    """Whether a strategy row's phases stand for skipped steps (extrapolate, rank1). Lookahead's reposition is part of
    every real step (SFPO counts rollouts, as we do): it is evaluated on the common cadence, like GRPO, and not
    around each of its phases (that would be two evals a step)."""
    return "schedule.strategy=lookahead" not in row


def row_overrides(row: list[str]) -> list[str]:
    """A strategy row as run: a skipping row's phases are evaluated around (EXTRA_OVERRIDES after its own)."""
    return [*row, *EXTRA_OVERRIDES] if skips_steps(row) else row


def arm_overrides(settings: Settings, arm: str) -> list[str]:
    updates = grpo_updates_of(arm)
    return grpo_row(updates) if updates is not None else row_overrides(settings.strategies[arm])


def compose_arm(task: tuple[str, ...], overrides: list[str]):
    """The typed config of a run of this task with these overrides."""
    from orchestrator.config import compose, validate

    return validate(compose([*task_overrides(task), *overrides]))


def first_projection_step(schedule) -> int:
    """The earliest real step at which a strategy's projection can be evaluated: the end of cycle 1, for every β mode
    (`auto` gates the first cycle on the drift share of its two halves)."""
    return schedule.m


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the arguments and compose every arm's config: bad input is a BenchError before anything starts."""
    from orchestrator.cli import describe_config_error
    from orchestrator.config import JobConfig

    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise BenchError(f"--strategies: expected names from {sorted(STRATEGIES)}, got {unknown}")
    overlap = sorted(set(args.seeds) & set(args.tune_seeds))
    if overlap:
        raise BenchError(f"--seeds: expected seeds disjoint from --tune-seeds, got {overlap} in both")
    for flag in ("grpo_lrs", "strategy_lrs"):
        if not all(lr > 0 for lr in getattr(args, flag)):
            raise BenchError(f"--{flag.replace('_', '-')}: expected positive learning rates, got {getattr(args, flag)}")
    if not all(u >= 1 for u in args.grpo_updates):
        raise BenchError(f"--grpo-updates: expected integers >= 1 (optimizer steps per batch), got {args.grpo_updates}")
    task = tuple(args.task)
    for word in task_overrides(task):
        key = word.split("=", 1)[0].lstrip("+~")
        if any(key == k or key.startswith(k + ".") for k in PROTOCOL_KEYS):
            raise BenchError(f"--task: {key} is set by the protocol; expected data or model overrides, got {word!r}")
    cfgs = {}
    for arm in (GRPO, grpo_arm(max(args.grpo_updates)), *args.strategies):
        updates = grpo_updates_of(arm)
        try:
            cfgs[arm] = compose_arm(task, grpo_row(updates) if updates else row_overrides(STRATEGIES[arm]))
        except Exception as exc:
            line = describe_config_error(exc, JobConfig)
            if line is None:
                raise
            raise BenchError(f"{'--task' if updates else f'strategy {arm}'}: {line}") from None
    # the skipping strategies' cycle lengths set the common eval cadence (lookahead's m = 1 would mean an eval a step)
    cycles = {arm: cfgs[arm].schedule.m for arm in args.strategies if skips_steps(STRATEGIES[arm])}
    passes = {
        arm: cfgs[arm].schedule.lookahead_steps + 1
        if not skips_steps(STRATEGIES[arm])
        else cfgs[arm].trainer.updates_per_batch
        for arm in args.strategies
    }
    latest_first = max(first_projection_step(cfgs[arm].schedule) for arm in args.strategies)
    steps = args.steps or max(DEFAULT_BUDGET, BUDGET_FACTOR * latest_first)
    data = cfgs[GRPO].data
    settings = Settings(
        task=task,
        tune_seeds=tuple(args.tune_seeds),
        seeds=tuple(args.seeds),
        strategies={arm: STRATEGIES[arm] for arm in args.strategies},
        grpo_updates=tuple(sorted(set(args.grpo_updates))),
        grpo_lrs=tuple(sorted(args.grpo_lrs)),
        strategy_lrs=tuple(sorted(args.strategy_lrs)),
        steps=steps,
        eval_every=math.gcd(*cycles.values()) if cycles else DEFAULT_EVAL_EVERY,
        eval_prompts=min(args.eval_prompts, data.toy.num_eval) if data.source == "toy" else args.eval_prompts,
        max_extensions=args.max_extensions,
        unstable_drop=args.unstable_drop,
        target_fraction=args.target_fraction,
        code=code_version(),
        train_code=code_version(TRAIN_CODE_PATHS),
    )
    deviations = []
    if steps < BUDGET_FACTOR * latest_first:
        deviations.append(f"budget {steps} < {BUDGET_FACTOR} x the latest first-projection step ({latest_first})")
    if len(settings.seeds) < MIN_REPORT_SEEDS:
        deviations.append(f"{len(settings.seeds)} report seed(s) < {MIN_REPORT_SEEDS}")
    if settings.eval_prompts < MIN_EVAL_PROMPTS:
        deviations.append(f"{settings.eval_prompts} eval prompts < {MIN_EVAL_PROMPTS}")
    if len(settings.grpo_updates) == 1:
        deviations.append(f"GRPO's optimizer steps per batch fixed at {settings.grpo_updates[0]} (--grpo-updates)")
    return Plan(settings, cycles, passes, deviations, args.cache_dir)


def estimate(plan: Plan) -> tuple[int, float]:
    """(runs, seconds) of a session before any lr or μ a bracket adds (COST_S; warm starts not included). A real step
    costs a rollout and its optimizer steps (GRPO: μ; lookahead: K fast + 1 slow, and its reposition phase). GRPO at
    each strategy's lr on the report seeds is counted, though it is GRPO-best's run when the lrs agree, and GRPO-best
    is costed at the smallest μ of the grid."""
    s, c, n = plan.settings, COST_S, plan.settings.steps

    def run_s(passes: int) -> float:
        return c["setup"] + n * (c["step"] + (passes - 1) * c["pass"]) + (n / s.eval_every + 1) * c["eval"]

    grpo_s = run_s(s.grpo_updates[0])
    per_strategy = [
        run_s(plan.passes[arm])
        + (n / plan.cycles[arm] * (c["phase"] + c["eval"]) if arm in plan.cycles else n * c["phase"])
        for arm in s.strategies
    ]
    k = len(per_strategy)
    tune = len(s.grpo_lrs) * sum(run_s(u) for u in s.grpo_updates) + len(s.strategy_lrs) * sum(per_strategy)
    runs = len(s.tune_seeds) * (len(s.grpo_lrs) * len(s.grpo_updates) + len(s.strategy_lrs) * k)
    runs += len(s.seeds) * (1 + 2 * k)
    return runs, len(s.tune_seeds) * tune + len(s.seeds) * ((1 + k) * grpo_s + sum(per_strategy))


# ------------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One finished job, as the protocol reads it back from MLflow."""

    arm: str
    lr: float
    seed: int
    curve: list[Point]
    finite_loss: bool
    setup_s: float  # actor start-up
    loop_s: float  # the job's loop: RL steps, extrapolation phases and evals
    step_s: float  # seconds in RL steps
    phase_s: float  # seconds in extrapolation phases
    projections: list[dict] = field(default_factory=list)

    @property
    def warm_start(self) -> float:
        return self.curve[0].acc

    @property
    def final(self) -> float:
        return self.curve[-1].acc


def lr_tag(lr: float) -> str:
    return f"{lr:.6g}"


class Store:
    """The runs in MLflow (sqlite at `db`, experiment `bench-step-savings`): tagged with the session and their run key
    when they finish, found by run key, read back from their metrics and summary.json."""

    def __init__(self, db: Path):
        from mlflow.tracking import MlflowClient

        self.db, self.uri = db, f"sqlite:///{db}"
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        artifacts = (db.parent / f"{db.stem}-artifacts").resolve().as_uri()  # beside the db, whatever the cwd
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT, artifacts)

    def tag(self, run_id: str, settings: Settings, arm: str, lr: float, seed: int, run_key: str) -> None:
        tags = {
            "bench_run": run_key,
            "bench_session": settings.key,
            "bench_settings": json.dumps(settings.as_json(), sort_keys=True),
            "bench_code": settings.code,
            "bench_arm": arm,
            "bench_lr": lr_tag(lr),
            "bench_seed": str(seed),
        }
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def newest(self, where: str, max_results: int = 1) -> list:
        """The finished runs matching `where` (an MLflow filter), newest first."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"{where} and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )

    def rekey(self, run_id: str, run_key: str, note: str) -> None:
        """--adopt: a stored run keyed anew, and why."""
        self.client.set_tag(run_id, "bench_run", run_key)
        self.client.set_tag(run_id, "bench_run_adopted", note)

    def find(self, run_key: str) -> tuple[str, str] | None:
        """The newest finished run of this key: (run id, the session that trained it)."""
        found = self.newest(f"tags.bench_run = '{run_key}'")
        return (found[0].info.run_id, found[0].data.tags["bench_session"]) if found else None

    def missing(self, settings: Settings, arm: str, lr: float, seed: int) -> BenchError:
        """--report-only lacks a run: one line saying what differs from the newest stored session, if anything."""
        newest = self.newest("tags.bench_session != ''")
        if not newest:
            return BenchError(f"--report-only: no stored runs in {self.db}; run without --report-only first")
        stored = json.loads(newest[0].data.tags["bench_settings"])
        diff = [
            f"{k} {stored.get(k)!r:.80} (here {v!r:.80})" for k, v in settings.as_json().items() if stored.get(k) != v
        ]
        why = f"the newest stored session differs in {'; '.join(diff)}" if diff else "its session was interrupted?"
        return BenchError(
            f"--report-only: {self.db} lacks {arm} lr={lr_tag(lr)} seed {seed} of this code and these settings "
            f"({why}); run without --report-only"
        )

    def load(self, run_id: str, arm: str, lr: float, seed: int) -> Run:
        def history(name: str) -> dict[int, float]:
            return {int(m.step): m.value for m in self.client.get_metric_history(run_id, name)}

        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per run read back otherwise
        with tempfile.TemporaryDirectory() as tmp:
            summary = json.loads(Path(self.client.download_artifacts(run_id, "summary.json", tmp)).read_text())
        # Phases evaluated around them: extrapolate / rank1. Lookahead's run inside its steps (their seconds are in
        # time/step_s already) and are not evaluated around, so they add no points and no seconds to the curve.
        records = [r for r in summary.get("extrapolations", []) if r["eval_before"] is not None]
        phases = [
            Phase(
                step=r["rl_step"],
                time_s=r["time_s"] if math.isfinite(r["time_s"]) else 0.0,  # NaN: a phase a dead engine broke off
                acc_before=r["eval_before"]["eval/avg_at_k"],
                acc_after=r["eval_after"]["eval/avg_at_k"],
            )
            for r in records
        ]
        step_s = history("time/step_s")
        return Run(
            arm=arm,
            lr=lr,
            seed=seed,
            curve=build_curve(history("eval/avg_at_k"), step_s, phases),
            finite_loss=all(math.isfinite(v) for v in history("train/loss").values()),
            setup_s=summary["setup_time_s"],
            loop_s=summary["wall_time_s"],
            step_s=sum(step_s.values()),
            phase_s=sum(p.time_s for p in phases),
            projections=[
                {
                    "rl_step": r["rl_step"],
                    "outcome": r["outcome"],
                    "beta": r["beta"],
                    "drift_share": finite_or_none(r["drift_share"]),
                    "acc_before": p.acc_before,
                    "acc_after": p.acc_after,
                }
                for r, p in zip(records, phases, strict=True)
            ],
        )


class Runs:
    """The session's runs by (arm, lr, seed): a stored run of the same key if there is one (unless `fresh`), else
    trained (live) or refused (--report-only). A run's key is its training code and its overrides (run_key)."""

    def __init__(self, plan: Plan, store: Store, live: bool, out_dir: str = "", fresh: bool = False):
        self.plan, self.settings, self.store, self.live, self.out_dir = plan, plan.settings, store, live, out_dir
        self.fresh = fresh
        self.cache: dict[tuple[str, str, int], Run] = {}
        self.reused: collections.Counter[str] = collections.Counter()  # session key → runs reused from it
        self.trained = 0
        self.started = time.perf_counter()
        self.expected_runs = estimate(plan)[0]

    def get(self, arm: str, lr: float, seed: int) -> Run:
        key = (arm, lr_tag(lr), seed)
        if key not in self.cache:
            stored = None if self.live and self.fresh else self.store.find(self.run_key(arm, lr, seed))
            if stored is None and not self.live:
                raise self.store.missing(self.settings, arm, lr, seed)
            if stored is None:
                run_id = self.train(arm, lr, seed)
            else:
                run_id, session = stored
                if session != self.settings.key:
                    self.reused[session] += 1
                if self.live:
                    say(f"{run_name(arm, lr, seed)}: the stored run {run_id} (session {session}), not retrained")
            self.cache[key] = self.store.load(run_id, arm, lr, seed)
        return self.cache[key]

    def protocol_overrides(self, arm: str, lr: float, seed: int) -> list[str]:
        """Everything a run's result depends on besides the training code (not where it writes)."""
        s = self.settings
        # RL-Extra arms are evaluated around every phase; periodic evals only fill in between their cycle boundaries
        eval_every = s.eval_every if arm not in self.plan.cycles or s.eval_every < self.plan.cycles[arm] else 0
        return [
            *task_overrides(s.task),
            *arm_overrides(s, arm),
            f"learner.lr={lr_tag(lr)}",
            f"seed={seed}",
            f"trainer.total_steps={s.steps}",
            f"trainer.eval_every={eval_every}",
            f"trainer.eval_prompts={s.eval_prompts}",
            "trainer.resume=never",
        ]

    def run_key(self, arm: str, lr: float, seed: int) -> str:
        return run_key(self.settings.train_code, self.protocol_overrides(arm, lr, seed))

    def train(self, arm: str, lr: float, seed: int) -> str:
        from orchestrator.config import compose
        from orchestrator.train import run_job

        t0 = time.perf_counter()
        common.start_ray()  # on the first run trained: a session of stored runs starts nothing
        name = run_name(arm, lr, seed)
        where = run_overrides(name, self.out_dir, self.store.uri, self.plan.cache_dir, EXPERIMENT)
        summary = run_job(compose([*self.protocol_overrides(arm, lr, seed), *where]), f"{self.out_dir}/{name}")
        self.store.tag(summary["mlflow_run_id"], self.settings, arm, lr, seed, self.run_key(arm, lr, seed))
        self.trained += 1
        done, spent = len(self.cache) + 1, time.perf_counter() - self.started
        left = max(self.expected_runs - done, 0) * spent / self.trained
        say(
            f"run {done}: {name} took {time.perf_counter() - t0:.0f} s (set-up {summary['setup_time_s']:.0f} s); "
            f"{spent / 60:.1f} min so far, about {left / 60:.0f} min left if no bracket adds an lr"
        )
        return summary["mlflow_run_id"]


ADOPT_SAME = ("task", "steps", "eval_every", "eval_prompts")  # what a stored session must share to be adopted
ADOPT_STALE = "stale"  # --adopt stale: every stored session that holds runs of this session's arms under older keys


@dataclass(frozen=True)
class Adoption:
    """What --adopt does for one stored session: which of its runs it keys anew, and the one it retrains first."""

    session: str
    code: str  # the training code its runs were trained at
    runs: tuple[tuple[str, float, int, str], ...]  # (arm, lr, seed, run id): its runs of this session's arms

    @property
    def check(self) -> tuple[str, float, int, str]:
        """The cheapest of its runs (GRPO at the smallest μ, then the smallest lr and seed): retrained and compared."""
        return min(self.runs, key=lambda m: (grpo_updates_of(m[0]) or 99, m[1], m[2]))


def plan_adoption(store: Store, s: Settings, session: str) -> Adoption:
    """--adopt's checks, made for every named session before anything trains: the session's finished runs exist,
    they share this session's task, budget, cadence and eval prompts, and some are of its arms (GRPO at any μ, or a
    strategy whose row is unchanged)."""
    found = store.newest(f"tags.bench_session = '{session}'", max_results=5000)
    if not found:
        raise BenchError(f"--adopt: no finished runs of session {session} in {store.db}")
    old = json.loads(found[0].data.tags["bench_settings"])
    differ = adopt_differences(old, s)
    if differ:
        raise BenchError(f"--adopt: session {session}'s runs differ in {'; '.join(differ)}")
    mine = [(*arm, r.info.run_id) for r in found if (arm := arm_of(r.data.tags, old, s))]
    if not mine:
        arms = sorted({r.data.tags["bench_arm"] for r in found})
        raise BenchError(f"--adopt: session {session}'s runs are of {arms}, none of this session's arms")
    return Adoption(session, old["code"], tuple(mine))


def adopt_differences(old: dict, s: Settings) -> list[str]:
    """What a stored session's settings (`old`) do not share with this session's of ADOPT_SAME, one phrase each."""
    return [f"{k} {old.get(k)!r} (here {v!r})" for k, v in s.as_json().items() if k in ADOPT_SAME and old.get(k) != v]


def arm_of(tags: dict, old: dict, s: Settings) -> tuple[str, float, int] | None:
    """A stored run's (arm, lr, seed) when it is a run of this session's arms (GRPO at any μ, or a strategy whose row
    is unchanged since its session's settings `old`), else None."""
    arm = tags["bench_arm"]
    if grpo_updates_of(arm) is None and old["strategies"].get(arm) != s.strategies.get(arm, False):
        return None
    return arm, float(tags["bench_lr"]), int(tags["bench_seed"])


def stale_sessions(runs: Runs) -> list[str]:
    """--adopt stale: the stored sessions that share this session's ADOPT_SAME settings and hold a run of its arms
    keyed to other training code than today's (its run key is not today's), newest first: the newest are the likeliest
    to reproduce, and an older one whose runs they cover is then skipped (`covered`)."""
    s, sessions = runs.settings, {}
    for r in runs.store.newest("tags.bench_session != ''", max_results=50000):
        sessions.setdefault(r.data.tags["bench_session"], []).append(r.data.tags)
    stale = []
    for session, tags in sessions.items():
        old = json.loads(tags[0].get("bench_settings", "{}"))  # runs stored before sessions had settings: never adopted
        if not old or adopt_differences(old, s):
            continue
        if any((arm := arm_of(t, old, s)) and t.get("bench_run") != runs.run_key(*arm) for t in tags):
            stale.append(session)
    return stale


def covered(runs: Runs, adoption: Adoption) -> bool:
    """Whether every run of this stored session has a run of today's key already (adopted from another session)."""
    return all(runs.store.find(runs.run_key(arm, lr, seed)) for arm, lr, seed, _ in adoption.runs)


def adopt(runs: Runs, adoption: Adoption, retrained: dict[tuple[str, float, int], str]) -> int:
    """--adopt: key a stored session's runs (trained at another code version) to today's training code, once one of
    them retrained today gives the same eval curve to the digit; returns how many were keyed. `retrained` maps the
    (arm, lr, seed) of every run retrained so far by this command to its run: a session holding one of those is
    compared with it instead of retraining another (sessions often share their cheapest run)."""
    store, s, session = runs.store, runs.settings, adoption.session
    shared = [m for m in adoption.runs if m[:3] in retrained]
    arm, lr, seed, run_id = shared[0] if shared else adoption.check
    name = run_name(arm, lr, seed)
    if shared:
        say(f"--adopt: session {session} (code {adoption.code}) against {name}, retrained already")
    else:
        say(f"--adopt: retraining {name} of session {session} (code {adoption.code}) at {s.train_code}")
        retrained[(arm, lr, seed)] = runs.train(arm, lr, seed)
    then = [(p.step, p.acc) for p in store.load(run_id, arm, lr, seed).curve]
    now = [(p.step, p.acc) for p in store.load(retrained[(arm, lr, seed)], arm, lr, seed).curve]
    if then != now:
        was, got = next((a, b) for a, b in itertools.zip_longest(then, now) if a != b)
        raise BenchError(
            f"--adopt: {run_name(arm, lr, seed)} retrained at {s.train_code} gives another eval curve than session "
            f"{session}'s (first difference, (step, Avg@k): {was} then, {got} now); its runs are left as they are"
        )
    note = (
        f"trained at code {adoption.code}; {run_name(arm, lr, seed)} retrained at {s.train_code}: the same eval curve"
    )
    for arm, lr, seed, run_id in adoption.runs:
        store.rekey(run_id, runs.run_key(arm, lr, seed), note)
    say(f"--adopt: {len(adoption.runs)} runs of session {session} keyed to training code {s.train_code}")
    return len(adoption.runs)


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{lr_tag(lr)}-seed{seed}"


def run_key(train_code: str, overrides: list[str]) -> str:
    """A run's identity: the training code that ran it and its protocol overrides (same key, same run)."""
    return hashlib.sha256(json.dumps([train_code, overrides]).encode()).hexdigest()[:16]


def prepare_warm_starts(plan: Plan) -> None:
    """Build every seed's warm start (each seed has its own; cached) before Ray starts, timed apart from the runs."""
    from transformers.utils import logging as hf_logging

    from orchestrator.data import resolve_model

    hf_logging.disable_progress_bar()
    s = plan.settings
    for seed in (*s.tune_seeds, *s.seeds):
        t0 = time.perf_counter()
        cfg = compose_arm(s.task, [*GRPO_OVERRIDES, f"seed={seed}", f"model.cache_dir={plan.cache_dir}"])
        resolve_model(cfg, log=lambda line: None)
        if time.perf_counter() - t0 > 1:
            say(f"warm start of seed {seed} built in {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------------- tuning


def best_lr(grid: Grid) -> float | None:
    return grid.best.lr if grid.best else None


def score_lr(runs: Runs, arm: str, lr: float) -> LrScore:
    """Median over the tuning seeds of the mean gain over the warm start across the budget; unstable on any seed."""
    s = runs.settings
    rs = [runs.get(arm, lr, seed) for seed in s.tune_seeds]
    gains = [gain_area(r.curve, r.warm_start) / s.steps for r in rs]
    return LrScore(lr, statistics.median(gains), any(is_unstable(r.curve, s.unstable_drop, r.finite_loss) for r in rs))


def tune_lr(runs: Runs, arm: str, initial: tuple[float, ...]) -> Grid:
    return grow_grid(
        lambda lr: score_lr(runs, arm, lr), initial, runs.settings.max_extensions, log=lambda x: say(f"{arm}: {x}")
    )


def tune_grpo(runs: Runs) -> tuple[str, dict[str, Grid], dict]:
    """GRPO-best's arm (its μ) and every GRPO arm's lr grid: each μ of the grid gets its own bracketed lr, and the μ
    grid grows (savings.bracket_updates, at most --max-extensions added μ) while its edge scores best; a single μ is
    fixed. Returns (arm, grids, the μ grid's summary)."""
    s = runs.settings
    grids: dict[str, Grid] = {}
    updates, fixed = list(s.grpo_updates), len(s.grpo_updates) == 1
    for added in range(s.max_extensions + 1):
        for u in updates:
            if grpo_arm(u) not in grids:
                grids[grpo_arm(u)] = tune_lr(runs, grpo_arm(u), s.grpo_lrs)
        bests = {u: grids[grpo_arm(u)].best for u in updates}
        scores = {u: top.score if top else None for u, top in bests.items()}
        b = bracket_updates(scores)
        if b.best is None:
            raise BenchError(f"--grpo-lrs: every GRPO lr tried is unstable at every μ {updates}; expected smaller lrs")
        if b.bracketed or fixed or added == s.max_extensions:
            reason = b.reason if b.bracketed else ("fixed" if fixed else f"not bracketed after {added} added μ")
            summary = {"updates": updates, "scores": [scores[u] for u in updates], "best": b.best, "stopped": reason}
            return grpo_arm(b.best), grids, summary
        say(f"GRPO μ: {b.reason}")
        updates = sorted({*updates, b.next_updates})
    raise AssertionError("unreachable: the loop returns at added == max_extensions")


def targets_for(settings: Settings, grpo_best: dict[int, Run]) -> dict[int, float]:
    """Per seed: target_fraction of the way from the seed's warm start to GRPO-best's median final accuracy."""
    final = statistics.median(r.final for r in grpo_best.values())
    return {seed: target_acc(r.warm_start, final, settings.target_fraction) for seed, r in grpo_best.items()}


def steps_to(run: Run, target: float) -> Cost:
    return first_hit(run.curve, target)


def seconds_to(run: Run, target: float) -> Cost:
    return first_hit(run.curve, target, cost=lambda p: p.compute_s)


def choose_strategy(runs: Runs, grids: dict[str, Grid], grpo: str) -> tuple[str | None, dict]:
    """On the tuning seeds: the strategy with the largest median step ratio vs GRPO-best, arm `grpo` (then gain
    area)."""
    s = runs.settings
    grpo_best = {seed: runs.get(grpo, best_lr(grids[grpo]), seed) for seed in s.tune_seeds}
    targets = targets_for(s, grpo_best)
    ranking = {}
    for arm in s.strategies:
        if best_lr(grids[arm]) is None:
            continue
        mine = {seed: runs.get(arm, best_lr(grids[arm]), seed) for seed in s.tune_seeds}
        ratio = median_bounds(
            [ratio_bounds(steps_to(grpo_best[k], t), steps_to(mine[k], t)) for k, t in targets.items()]
        )
        gain = statistics.median(gain_area(mine[k].curve, grpo_best[k].warm_start) for k in targets)
        ranking[arm] = (ratio, gain)
    chosen = max(ranking, key=lambda a: (ranking[a][0].lo, ranking[a][0].hi, ranking[a][1])) if ranking else None
    return chosen, {
        "targets": {str(k): round(v, 4) for k, v in targets.items()},
        "step_ratio": {arm: ratio.as_json() for arm, (ratio, _) in ranking.items()},
        "chosen": chosen,
    }


# ---------------------------------------------------------------------------------------------------- report


def median_known(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def strategy_row(
    lr: float,
    targets: dict[int, float],
    grpo_best: dict[int, Run],
    same: dict[int, Run],
    mine: dict[int, Run],
    eval_prompts: int,
) -> dict:
    """One strategy on the report seeds against GRPO-best and GRPO at the strategy's lr: every number per seed, and
    its median over the seeds; `ends_below_grpo_best`: the seeds where it ends more than one eval SE below."""
    per_seed = {}
    for seed, t in targets.items():
        g, q, r = grpo_best[seed], same[seed], mine[seed]
        per_seed[seed] = {
            "target": t,
            "steps": steps_to(r, t),
            "steps_grpo_best": steps_to(g, t),
            "steps_grpo_same_lr": steps_to(q, t),
            "ratio": ratio_bounds(steps_to(g, t), steps_to(r, t)),
            "same_lr_ratio": ratio_bounds(steps_to(q, t), steps_to(r, t)),
            "wall_ratio": ratio_bounds(seconds_to(g, t), seconds_to(r, t)),
            "auc_ratio": area_ratio(gain_area(r.curve, g.warm_start), gain_area(g.curve, g.warm_start)),
            "final_acc_delta": r.final - g.final,
            "final_acc_delta_same_lr": r.final - q.final,
            "ends_below_grpo_best": ends_below(r.final, g.final, eval_prompts),
        }
    projections = [p for r in mine.values() for p in r.projections]
    made = [p for p in projections if p["outcome"] == "made"]
    drift = [p["drift_share"] for p in projections if p["drift_share"] is not None]
    column = lambda key: [v[key] for v in per_seed.values()]  # noqa: E731
    return {
        "lr": lr,
        "ratio": median_bounds(column("ratio")),
        "same_lr_ratio": median_bounds(column("same_lr_ratio")),
        "wall_ratio": median_bounds(column("wall_ratio")),
        "auc_ratio": median_known(column("auc_ratio")),
        "final_acc_delta": statistics.median(column("final_acc_delta")),
        "final_acc_delta_same_lr": statistics.median(column("final_acc_delta_same_lr")),
        "ends_below_grpo_best": [seed for seed, v in per_seed.items() if v["ends_below_grpo_best"]],
        "cycle_overhead_frac": sum(r.phase_s for r in mine.values()) / sum(r.step_s for r in mine.values()),
        "projections": {k: sum(p["outcome"] == k for p in projections) for k in ("made", "skipped", "rolled_back")},
        "acc_jump_per_projection": statistics.mean(p["acc_after"] - p["acc_before"] for p in made) if made else None,
        "drift_share_mean": statistics.mean(drift) if drift else None,
        "per_seed": per_seed,
    }


def jsonable(v):
    """Bounds as {lo, hi, kind}, costs as {value, censored}, no infinities, floats rounded."""
    if isinstance(v, Bound):
        return v.as_json()
    if isinstance(v, Cost):
        return {"value": v.value, "censored": v.censored}
    if isinstance(v, float):
        return finite_or_none(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


def print_report(
    settings: Settings, grids: dict[str, Grid], grpo: str, grpo_best: dict[int, Run], rows: dict, chosen
) -> None:
    say(f"lr grids on tuning seeds {list(settings.tune_seeds)} (score: mean gain over the warm start):")
    for arm, grid in grids.items():
        cells = ", ".join(f"{s.lr:.3g}: {s.score:.3f}{' unstable' if s.unstable else ''}" for s in grid.scores)
        say(f"  {arm:<20} {cells} -> best {best_lr(grid)} ({grid.reason})")
    say(
        f"report seeds (GRPO-best {grpo}, lr {best_lr(grids[grpo]):.3g}): "
        + ", ".join(f"{k}: warm start {r.warm_start:.3f} -> final {r.final:.3f}" for k, r in grpo_best.items())
    )
    print(
        f"{'strategy':<22}{'lr':>8}  {'vs GRPO-best':>12}  {'per seed':<22}{'same lr':>9}  {'auc':>5}  "
        f"{'final Δ':>7}  {'below':>5}  {'wall':>6}  {'overhead':>8}  made/skipped/rolled back"
    )
    for arm, row in rows.items():
        per_seed = " ".join(str(v["ratio"]) for v in row["per_seed"].values())
        auc = "-" if row["auc_ratio"] is None else f"{row['auc_ratio']:.2f}"
        p = row["projections"]
        below = len(row["ends_below_grpo_best"])
        print(
            f"{('* ' if arm == chosen else '  ') + arm:<22}{row['lr']:>8.3g}  {str(row['ratio']):>12}  {per_seed:<22}"
            f"{str(row['same_lr_ratio']):>9}  {auc:>5}  {row['final_acc_delta']:>+7.3f}  {below:>5}  "
            f"{str(row['wall_ratio']):>6}  "
            f"{row['cycle_overhead_frac']:>8.1%}  {p['made']}/{p['skipped']}/{p['rolled_back']}",
            flush=True,
        )


def timing(runs: Runs) -> dict:
    """The session's own per-run costs (to check COST_S against)."""
    rs = list(runs.cache.values())
    arms = sorted({r.arm for r in rs})
    return {
        "runs": len(rs),
        "reused": dict(runs.reused),  # the rest: this session's
        "step_s_by_arm": {
            a: round(statistics.mean(r.step_s for r in rs if r.arm == a) / runs.settings.steps, 3) for a in arms
        },
        "setup_s_median": round(statistics.median(r.setup_s for r in rs), 1),
        "step_s_mean": round(sum(r.step_s for r in rs) / (len(rs) * runs.settings.steps), 3),
        "evals_s_median": round(statistics.median(r.loop_s - r.step_s - r.phase_s for r in rs), 1),
        "loop_s_median": round(statistics.median(r.loop_s for r in rs), 1),
    }


# ------------------------------------------------------------------------------------------------------ plot


def mean_band(runs: list[Run], x) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean, min and max of the accuracy over seeds at every eval point the seeds share; a point is (step, its
    index among the evals at that step): a phase's before and after evals are two points at one step."""
    keyed = []
    for r in runs:
        count: dict[int, int] = {}
        points = {}
        for p in r.curve:
            count[p.step] = count.get(p.step, -1) + 1
            points[(p.step, count[p.step])] = p
        keyed.append(points)
    keys = sorted(set.intersection(*(set(k) for k in keyed)))
    accs = [[points[k].acc for points in keyed] for k in keys]
    xs = [statistics.mean(x(points[k]) for points in keyed) for k in keys]
    return xs, [statistics.mean(a) for a in accs], [min(a) for a in accs], [max(a) for a in accs]


def plot(path: Path, rows: dict, arms: dict[str, dict[str, tuple[str, dict[int, Run]]]], target: float) -> None:
    """Per strategy (a row of panels): mean and range over the report seeds against real steps and compute seconds;
    `arms[strategy]` maps a colour to (label, runs by seed): GRPO-best, the strategy, GRPO at its lr when different."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.6 * len(rows)), squeeze=False)
    axis = (
        ("real RL steps", lambda p: p.step),
        ("compute seconds (RL steps + extrapolation phases)", lambda p: p.compute_s),
    )
    for row_axes, (arm, row) in zip(axes, rows.items(), strict=True):
        for ax, (xlabel, x) in zip(row_axes, axis, strict=True):
            for color, (label, by_seed) in arms[arm].items():
                xs, mean, lo, hi = mean_band(list(by_seed.values()), x)
                ax.plot(xs, mean, color=color, label=label, lw=1.5)
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
            ax.axhline(target, color="grey", lw=0.8, ls=":", label="target (median over seeds)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval Avg@k")
            ax.grid(alpha=0.3)
        row_axes[0].set_title(
            f"{arm}: vs GRPO-best {row['ratio']}, vs GRPO at its lr {row['same_lr_ratio']}", fontsize=9
        )
        row_axes[0].legend(fontsize=7)
    fig.suptitle("step savings: mean and range over the report seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- protocol


def run_protocol(plan: Plan, runs: Runs, plot_path: Path) -> dict:
    """Tuning, then report; returns the JSON result (the headline and everything beside it)."""
    s = plan.settings
    grpo, grids, updates = tune_grpo(runs)
    for arm in s.strategies:
        grids[arm] = tune_lr(runs, arm, s.strategy_lrs)
    chosen, tuning = choose_strategy(runs, grids, grpo)

    lr_best, mu = best_lr(grids[grpo]), grpo_updates_of(grpo)
    grpo_best = {seed: runs.get(grpo, lr_best, seed) for seed in s.seeds}
    targets = targets_for(s, grpo_best)
    rows, arms = {}, {}
    for arm in s.strategies:
        lr = best_lr(grids[arm])
        if lr is None:
            continue
        mine = {seed: runs.get(arm, lr, seed) for seed in s.seeds}
        same = {seed: runs.get(grpo, lr, seed) for seed in s.seeds}
        rows[arm] = strategy_row(lr, targets, grpo_best, same, mine, s.eval_prompts)
        arms[arm] = {"C0": (f"GRPO-best (μ {mu}, lr {lr_best:.3g})", grpo_best), "C3": (f"{arm} (lr {lr:.3g})", mine)}
        if lr != lr_best:
            arms[arm]["C2"] = (f"GRPO at lr {lr:.3g} (μ {mu})", same)
    for seed in s.seeds:
        starts = sorted({r.warm_start for (_, _, k), r in runs.cache.items() if k == seed})
        if len(starts) > 1:
            say(f"warning: seed {seed}'s step-0 evals differ between runs {starts}: the eval is not deterministic")
    print_report(s, grids, grpo, grpo_best, rows, chosen)
    if rows:
        plot(plot_path, rows, arms, statistics.median(targets.values()))
    head = rows.get(chosen, {})
    pick = lambda key, end="lo": getattr(head[key], end) if head else None  # noqa: E731
    return jsonable(
        {
            "metric": "real_step_ratio_vs_best_grpo",
            "value": pick("ratio"),
            "value_upper": pick("ratio", "hi"),
            "value_kind": head["ratio"].kind if head else None,
            "goal": 2,
            "same_lr_ratio": pick("same_lr_ratio"),
            "same_lr_ratio_upper": pick("same_lr_ratio", "hi"),
            "same_lr_goal": 6,
            "auc_ratio": head.get("auc_ratio"),
            "final_acc_delta": head.get("final_acc_delta"),
            "ends_below_grpo_best": head.get("ends_below_grpo_best"),
            "wall_ratio": pick("wall_ratio"),
            "wall_ratio_upper": pick("wall_ratio", "hi"),
            "cycle_overhead_frac": head.get("cycle_overhead_frac"),
            "strategy": chosen,
            "strategy_lr": head.get("lr"),
            "grpo_best_lr": lr_best,
            "grpo_best_updates": mu,
            "grpo_updates": updates,
            "grpo_best_final_median": statistics.median(r.final for r in grpo_best.values()),
            "target_fraction": s.target_fraction,
            "targets": targets,
            "warm_start": {seed: r.warm_start for seed, r in grpo_best.items()},
            "grids": {arm: g.as_json() for arm, g in grids.items()},
            "tuning": tuning,
            "strategies": rows,
            "curves": {
                f"{arm}@{lr}-seed{seed}": [[p.step, round(p.compute_s, 2), p.acc] for p in r.curve]
                for (arm, lr, seed), r in runs.cache.items()
                if seed in s.seeds
            },
            "task": list(s.task),
            "tune_seeds": list(s.tune_seeds),
            "seeds": list(s.seeds),
            "real_steps": s.steps,
            "eval_every": s.eval_every,
            "eval_prompts": s.eval_prompts,
            "code": s.code,
            "session": s.key,
            "deviations": plan.deviations,
            "timing": timing(runs),
            "plot": str(plot_path.relative_to(ROOT) if plot_path.is_relative_to(ROOT) else plot_path) if rows else None,
        }
    )


# ------------------------------------------------------------------------------------------------------ main


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise BenchError(message)


def run_cli(name: str, main) -> None:
    """Run a bench's `main`; bad input (BenchError) is one line on stderr and exit code 2, no traceback."""
    try:
        main()
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=[DEFAULT_TASK], help="a data preset name and/or data/model overrides")
    ap.add_argument("--tune-seeds", nargs="+", type=int, default=[0], help="seeds that choose every lr and strategy")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="report seeds (>= 3, disjoint)")
    ap.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES), help=f"rows of {list(STRATEGIES)}")
    ap.add_argument("--grpo-lrs", nargs="+", type=float, default=[2e-4, 4e-4, 8e-4], help="GRPO's lr grid, every μ")
    ap.add_argument(
        "--grpo-updates",
        nargs="+",
        type=int,
        default=[1, 2, 4],
        help="GRPO's initial grid of optimizer steps per rollout batch (trainer.updates_per_batch); one value: fixed",
    )
    ap.add_argument("--strategy-lrs", nargs="+", type=float, default=[1e-4, 2e-4, 4e-4], help="each strategy's")
    ap.add_argument(
        "--steps",
        type=int,
        help=f"the budget in real steps (default {DEFAULT_BUDGET}; >= 8 x the latest first projection)",
    )
    ap.add_argument("--eval-prompts", type=int, default=MIN_EVAL_PROMPTS)
    ap.add_argument("--max-extensions", type=int, default=2, help="lrs a bracket may add to each grid")
    ap.add_argument("--unstable-drop", type=float, default=0.1, help="unstable: final this far below the run's best")
    ap.add_argument("--target-fraction", type=float, default=0.9)
    ap.add_argument("--db", type=Path, default=RESULTS / "step_savings.db", help="the MLflow store of the runs")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "rlextra", help="warm starts and toy data")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "step_savings.png")
    ap.add_argument("--report-only", action="store_true", help="no training: the report from the stored runs")
    ap.add_argument("--fresh", action="store_true", help="train every run, even one stored with the same key")
    ap.add_argument(
        "--adopt",
        nargs="+",
        default=[],
        metavar="SESSION",
        help="key these stored sessions' runs to today's training code if one of them, retrained, gives the same curve "
        f"('{ADOPT_STALE}': every stored session holding runs of this session's arms under older keys)",
    )
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise BenchError(f"--steps: expected an integer >= 1, got {args.steps}")
    if args.eval_prompts < 1:
        raise BenchError(f"--eval-prompts: expected an integer >= 1, got {args.eval_prompts}")
    if args.max_extensions < 0:
        raise BenchError(f"--max-extensions: expected an integer >= 0, got {args.max_extensions}")
    if not 0 < args.unstable_drop < 1:
        raise BenchError(f"--unstable-drop: expected a number in (0, 1), got {args.unstable_drop}")
    if args.adopt and args.report_only:
        raise BenchError("--adopt: retrains a run to check the stored ones; expected no --report-only")
    if not 0 < args.target_fraction <= 1:
        raise BenchError(f"--target-fraction: expected a number in (0, 1], got {args.target_fraction}")
    return args


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    args = parse_args(argv)
    plan = make_plan(args)
    s = plan.settings
    if plan.deviations:
        say(
            "deviations from the protocol (fine to test the machinery, not for a headline): "
            + "; ".join(plan.deviations)
        )
    if args.report_only and not args.db.exists():
        raise BenchError(f"--db: expected the stored runs of a session for --report-only, got no file {args.db}")
    args.db.parent.mkdir(parents=True, exist_ok=True)
    store = Store(args.db)
    if args.report_only:
        result = run_protocol(plan, Runs(plan, store, live=False), args.plot)
    else:
        sessions = [x for x in args.adopt if x != ADOPT_STALE]
        stale = stale_sessions(Runs(plan, store, live=False)) if ADOPT_STALE in args.adopt else []
        if ADOPT_STALE in args.adopt:
            say(f"--adopt {ADOPT_STALE}: sessions {', '.join(stale) or 'none'} hold runs keyed to older training code")
            sessions += [x for x in stale if x not in sessions]
        adoptions = [plan_adoption(store, s, session) for session in sessions]  # every refusal before any training
        n, secs = estimate(plan)
        say(
            f"session {s.key}, code {s.code}: {s.steps} real steps per run, an eval every {s.eval_every} on "
            f"{s.eval_prompts} prompts; about {n} runs, {secs / 60:.0f} min on a quiet 2-core machine, plus "
            f"about {COST_S['warm_start']:.0f} s per warm start not cached yet and each lr a bracket adds"
        )
        prepare_warm_starts(plan)
        import ray

        started = not ray.is_initialized()  # one Ray for every run (Runs.train starts it); a caller's is left running
        try:
            with tempfile.TemporaryDirectory() as tmp:
                runs = Runs(plan, store, live=True, out_dir=tmp, fresh=args.fresh)
                retrained = {}
                for adoption in adoptions:
                    if adoption.session in stale and covered(runs, adoption):
                        say(f"--adopt: session {adoption.session}'s runs are all keyed to today's code already")
                        continue
                    adopt(runs, adoption, retrained)
                result = run_protocol(plan, runs, args.plot)
        finally:
            if started:
                ray.shutdown()
    result["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    emit(result)
    return result


if __name__ == "__main__":
    run_cli("step_savings", main)
