"""The step-savings protocol's arithmetic (bench/savings.py): targets, censoring, step-0 hits, medians of bounds,
curves, instability and lr brackets; and the benchmark's refusals (bench/step_savings.py): bad input and stored runs of
other settings fail with one line and exit code 2, before anything starts."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from savings import (  # noqa: E402  (bench/ is not a package: it is put on the path above)
    INF,
    Bound,
    Cost,
    LrScore,
    Phase,
    Point,
    area_ratio,
    bracket,
    bracket_updates,
    build_curve,
    ends_below,
    eval_se,
    finite_or_none,
    first_hit,
    gain_area,
    grow_grid,
    is_unstable,
    median_bounds,
    ratio_bounds,
    target_acc,
)


def curve(*step_acc: tuple[int, float]) -> list[Point]:
    return [Point(step, float(step), acc) for step, acc in step_acc]


# ------------------------------------------------------------------------------------------- target, hits


def test_json_numbers_keep_four_significant_digits_and_infinity_is_null():
    """An lr grid of 5e-05 and 1e-04 must stay two lrs in the report (rounding to decimals merged them)."""
    assert finite_or_none(5e-05) == 5e-05 and finite_or_none(1.6e-3) == 1.6e-3
    assert finite_or_none(0.876543) == 0.8765 and finite_or_none(123.456) == 123.5
    assert finite_or_none(INF) is None and finite_or_none(-INF) is None and finite_or_none(None) is None


def test_target_is_ninety_percent_of_the_way_from_the_warm_start_to_grpo_best():
    assert target_acc(0.4, 0.8) == pytest.approx(0.76)
    assert target_acc(0.4, 0.8, fraction=0.5) == pytest.approx(0.6)
    assert target_acc(0.9, 0.8) == pytest.approx(0.81)  # a seed that starts above GRPO-best's final: at once


def test_first_hit_is_the_first_eval_at_or_above_the_target_else_censored_at_the_budget():
    c = curve((0, 0.4), (5, 0.6), (10, 0.76), (15, 0.9))
    assert first_hit(c, 0.76) == Cost(10, censored=False)  # equality counts
    assert first_hit(c, 0.3) == Cost(0, censored=False)  # the warm start already there
    assert first_hit(c, 0.95) == Cost(15, censored=True)
    timed = [Point(0, 0.0, 0.4), Point(5, 2.5, 0.5), Point(5, 3.5, 0.8)]  # a projection at step 5 took 1 s
    assert first_hit(timed, 0.8, cost=lambda p: p.compute_s) == Cost(3.5, censored=False)
    assert first_hit(timed, 0.8) == Cost(5, censored=False)


# ------------------------------------------------------------------------------------------------ ratios


def hit(x):
    return Cost(x, censored=False)


def censored(budget):
    return Cost(budget, censored=True)


def test_ratio_when_both_reach_the_target():
    assert ratio_bounds(hit(20), hit(10)) == Bound(2.0, 2.0)
    assert ratio_bounds(hit(10), hit(20)).kind == "exact"


def test_a_censored_candidate_gives_an_upper_bound_and_a_censored_reference_a_lower_bound():
    upper = ratio_bounds(hit(20), censored(40))  # the candidate needs more than 40 steps
    assert (upper.lo, upper.hi, upper.kind) == (0.0, 0.5, "upper")
    lower = ratio_bounds(censored(40), hit(10))  # GRPO-best needs more than 40
    assert (lower.lo, lower.hi, lower.kind) == (4.0, INF, "lower")
    unknown = ratio_bounds(censored(40), censored(40))
    assert (unknown.lo, unknown.hi, unknown.kind) == (0.0, INF, "unknown")


def test_step_zero_hits_never_divide_by_zero():
    assert ratio_bounds(hit(0), hit(0)) == Bound(1.0, 1.0)  # both warm starts at the target: nothing to save
    assert ratio_bounds(hit(0), hit(10)) == Bound(0.0, 0.0)  # GRPO-best needed no step, the candidate 10
    assert ratio_bounds(hit(0), censored(40)) == Bound(0.0, 0.0)
    assert ratio_bounds(hit(10), hit(0)) == Bound(INF, INF)
    assert ratio_bounds(censored(40), hit(0)) == Bound(INF, INF)


def test_the_median_of_bounds_is_the_interval_of_the_medians_of_their_ends():
    # a censored seed on the far side of the median changes nothing
    assert median_bounds([Bound(2, 2), Bound(3, 3), Bound(4, INF)]) == Bound(3, 3)
    assert median_bounds([Bound(1, 1), Bound(0, 0.5), Bound(2, 2)]) == Bound(1, 1)
    # a censored seed at the median makes the headline a bound, and says so
    m = median_bounds([Bound(1, 1), Bound(3, INF), Bound(4, INF)])
    assert (m.lo, m.hi, m.kind, str(m)) == (3, INF, "lower", ">=3.00")
    m = median_bounds([Bound(1, 1), Bound(0, 0.5), Bound(0, 0.8)])
    assert (m.lo, m.hi, m.kind, str(m)) == (0, 0.8, "upper", "<=0.80")
    # even counts average the two middle ends; infinity stays infinite
    m = median_bounds([Bound(2, 2), Bound(4, INF)])
    assert (m.lo, m.hi) == (3, INF)
    assert median_bounds([Bound(2, 2), Bound(4, 4)]) == Bound(3, 3)


def test_bounds_serialise_without_infinities():
    assert Bound(4, INF).as_json() == {"lo": 4, "hi": None, "kind": "lower"}
    assert json.dumps(Bound(0, INF).as_json()) == '{"lo": 0, "hi": null, "kind": "unknown"}'


# ------------------------------------------------------------------------------------------------ curves


def test_a_grpo_curve_counts_the_seconds_of_the_steps_before_each_eval():
    c = build_curve({0: 0.4, 5: 0.5, 10: 0.6}, {s: 1.0 + s / 10 for s in range(1, 11)}, [])
    assert [(p.step, p.acc) for p in c] == [(0, 0.4), (5, 0.5), (10, 0.6)]
    assert [p.compute_s for p in c] == pytest.approx([0.0, 6.5, 15.5])


def test_an_extrapolation_phase_gives_two_points_and_its_seconds_count_after_the_first():
    evals = {0: 0.4, 5: 0.6, 10: 0.7}  # the job's own eval at step 5 is taken after the phase
    phases = [Phase(step=5, time_s=2.0, acc_before=0.5, acc_after=0.6)]
    c = build_curve(evals, {s: 1.0 for s in range(1, 11)}, phases)
    assert [(p.step, p.compute_s, p.acc) for p in c] == [
        (0, 0.0, 0.4),
        (5, 5.0, 0.5),
        (5, 7.0, 0.6),
        (10, 12.0, 0.7),
    ]


def test_gain_area_is_the_trapezoid_area_above_the_warm_start():
    c = curve((0, 0.4), (10, 0.6), (10, 0.7), (20, 0.7))  # a projection at step 10 adds no width
    assert gain_area(c, 0.4) == pytest.approx(10 * 0.1 + 0 + 10 * 0.3)
    assert gain_area(curve((0, 0.4), (10, 0.3)), 0.4) == pytest.approx(-0.5)
    assert area_ratio(4.0, 2.0) == 2.0
    assert area_ratio(4.0, 0.0) is None  # the reference gained nothing: no ratio


def test_ending_below_grpo_means_more_than_one_eval_standard_error_at_grpos_final():
    assert eval_se(0.96, 500) == pytest.approx(0.008764, abs=1e-6)  # √(0.96 · 0.04 / 500)
    assert ends_below(0.957, 0.9745, 500)  # toy_skills seed 2: 0.0175 below, SE 0.0070
    assert not ends_below(0.968, 0.9745, 500)  # 0.0065 below: within one SE
    assert not ends_below(0.99, 0.9745, 500)  # above
    assert not ends_below(1.0, 1.0, 500) and ends_below(0.99, 1.0, 500)  # p = 1: SE 0, any deficit counts


def test_unstable_means_a_non_finite_loss_or_a_final_well_below_the_runs_best():
    plateau = curve((0, 0.4), (10, 0.80), (20, 0.85), (30, 0.79))  # eval noise around a plateau
    assert not is_unstable(plateau, drop=0.1)
    collapsed = curve((0, 0.4), (10, 0.8), (20, 0.3))
    assert is_unstable(collapsed, drop=0.1)
    below_start = curve((0, 0.4), (10, 0.35), (20, 0.25))  # never rose, ended well below the warm start
    assert is_unstable(below_start, drop=0.1)
    assert is_unstable(plateau, drop=0.1, finite_loss=False)


# ------------------------------------------------------------------------------------------------ brackets


def grid(*triples) -> list[LrScore]:
    return [LrScore(lr, score, unstable) for lr, score, unstable in triples]


def test_an_interior_best_is_bracketed():
    b = bracket(grid((1e-4, 0.1, False), (2e-4, 0.3, False), (4e-4, 0.2, False)))
    assert (b.best.lr, b.bracketed, b.next_lr) == (2e-4, True, None)


def test_a_best_at_an_edge_extends_the_grid_beyond_that_edge():
    top = bracket(grid((1e-4, 0.1, False), (2e-4, 0.2, False), (4e-4, 0.3, False)))
    assert (top.best.lr, top.bracketed, top.next_lr) == (4e-4, False, 8e-4)
    bottom = bracket(grid((1e-4, 0.3, False), (2e-4, 0.2, False), (4e-4, 0.1, False)))
    assert (bottom.best.lr, bottom.bracketed, bottom.next_lr) == (1e-4, False, 5e-5)


def test_an_unstable_larger_lr_closes_the_bracket_even_with_a_higher_score():
    b = bracket(grid((1e-4, 0.1, False), (2e-4, 0.2, False), (4e-4, 0.5, True)))
    assert (b.best.lr, b.bracketed) == (2e-4, True)
    assert "unstable" in b.reason


def test_every_lr_unstable_tries_a_smaller_one_and_ties_are_not_worse():
    b = bracket(grid((1e-4, 0.3, True), (2e-4, 0.1, True)))
    assert (b.best, b.bracketed, b.next_lr) == (None, False, 5e-5)
    tie = bracket(grid((1e-4, 0.1, False), (2e-4, 0.3, False), (4e-4, 0.3, False)))
    assert (tie.best.lr, tie.bracketed, tie.next_lr) == (2e-4, False, 8e-4)  # the smaller of equals; not closed


def test_the_grid_grows_until_the_best_is_bracketed_and_says_why_it_stopped():
    def score(lr):  # unimodal in log lr, best at 4e-4, unstable from 1.6e-3
        return LrScore(lr, -abs(math.log2(lr / 4e-4)), lr >= 1.6e-3)

    tried = []
    g = grow_grid(lambda lr: tried.append(lr) or score(lr), [1e-4, 2e-4], max_added=3)
    assert tried == [1e-4, 2e-4, 4e-4, 8e-4]
    assert (g.best.lr, g.bracketed) == (4e-4, True)
    assert [s.lr for s in g.scores] == [1e-4, 2e-4, 4e-4, 8e-4]
    capped = grow_grid(score, [1e-4, 2e-4], max_added=1)
    assert (capped.best.lr, capped.bracketed) == (4e-4, False)
    assert capped.reason.startswith("not bracketed after 1 added lr(s)")
    assert capped.as_json()["lrs"] == [1e-4, 2e-4, 4e-4]


def test_grpos_steps_per_batch_are_bracketed_from_one_and_double_beyond_the_top():
    """μ = 1 closes the low side by itself; a best at the grid's top doubles it; a μ without a stable lr is worse;
    ties go to the smaller μ (fewer passes) and do not close a bracket."""
    one = bracket_updates({1: 0.6, 2: 0.5, 4: 0.4})
    assert (one.best, one.bracketed, one.next_updates) == (1, True, None)
    inner = bracket_updates({1: 0.5, 2: 0.7, 4: 0.6})
    assert (inner.best, inner.bracketed) == (2, True)
    top = bracket_updates({1: 0.5, 2: 0.6, 4: 0.7})
    assert (top.best, top.bracketed, top.next_updates) == (4, False, 8)
    assert "try 8" in top.reason
    unstable_above = bracket_updates({1: 0.5, 2: 0.6, 4: None})
    assert (unstable_above.best, unstable_above.bracketed) == (2, True)
    low_open = bracket_updates({4: 0.7, 8: 0.6})
    assert (low_open.best, low_open.bracketed, low_open.next_updates) == (4, False, 2)
    tie = bracket_updates({1: 0.6, 2: 0.6, 4: 0.5})  # the smaller of equals; an equal one is not worse (as lrs)
    assert (tie.best, tie.bracketed, tie.next_updates) == (1, False, 8)
    nothing = bracket_updates({1: None, 2: None})
    assert (nothing.best, nothing.next_updates) == (None, None)


def test_tuning_grows_grpos_steps_per_batch_until_bracketed_each_with_its_own_bracketed_lr(tmp_path):
    """tune_grpo on synthetic runs whose gain peaks at μ = 8 and, for each μ, at lr 4e-4 / μ: the μ grid {1, 2, 4}
    doubles to 8 and 16, every μ's lr grid grows to bracket its own best, and GRPO-best is (8, 5e-5)."""
    from step_savings import Run, grpo_arm, grpo_updates_of, make_plan, parse_args, tune_grpo

    def gain(mu: int, lr: float) -> float:
        return 1.0 - 0.1 * abs(math.log2(mu / 8)) - 0.05 * abs(math.log2(lr * mu / 4e-4))

    class SyntheticRuns:
        def __init__(self, settings):
            self.settings, self.asked = settings, []

        def get(self, arm, lr, seed):
            self.asked.append((arm, lr))
            acc = min(1.0, 0.1 + gain(grpo_updates_of(arm), lr) / 2)
            points = [Point(0, 0.0, 0.1), Point(self.settings.steps, 1.0, acc)]
            return Run(arm, lr, seed, points, True, 0.0, 0.0, 0.0, 0.0)

    plan = make_plan(parse_args(["--db", str(tmp_path / "runs.db"), "--max-extensions", "3"]))
    runs = SyntheticRuns(dataclasses.replace(plan.settings, grpo_lrs=(1e-4, 2e-4, 4e-4)))
    best, grids, summary = tune_grpo(runs)
    assert best == grpo_arm(8) == "grpo-u8" and grids[best].best.lr == pytest.approx(5e-5)
    assert summary["updates"] == [1, 2, 4, 8, 16] and summary["best"] == 8 and "neighbours worse" in summary["stopped"]
    for mu in (1, 2, 4, 8, 16):
        g = grids[grpo_arm(mu)]
        assert g.bracketed and g.best.lr == pytest.approx(4e-4 / mu), f"μ {mu}: {g.as_json()}"
    fixed_plan = make_plan(parse_args(["--db", str(tmp_path / "runs.db"), "--grpo-updates", "1"]))
    assert fixed_plan.deviations == ["GRPO's optimizer steps per batch fixed at 1 (--grpo-updates)"]
    fixed, fixed_grids, fixed_summary = tune_grpo(SyntheticRuns(fixed_plan.settings))
    assert (fixed, list(fixed_grids), fixed_summary["stopped"]) == ("grpo", ["grpo"], "fixed")


def test_every_result_line_names_the_code_and_the_machine_it_was_measured_on(capsys):
    import os

    import common

    common.emit({"metric": "m", "value": 1.0})
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["metric"], got["value"], got["machine"]["cores"]) == ("m", 1.0, os.cpu_count())
    assert isinstance(got["machine"]["cpu"], str) and got["machine"]["cpu"]
    head = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", *common.CODE_PATHS],
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    assert got["code"].split("+dirty-")[0] == head
    common.emit({"metric": "m", "value": 1.0, "code": "abc1234"})  # a bench's own (its stored runs') is kept
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["code"] == "abc1234"


# ------------------------------------------------------------------------------------- the benchmark's refusals


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_savings.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--seeds", "0", "1", "2", "--tune-seeds", "0"], "--seeds: expected seeds disjoint from --tune-seeds"),
        (["--task", "data.toy.digitz=3"], "--task: data.toy.digitz: not a field of data.toy"),
        (["--task", "learner.lr=1e-3"], "--task: learner.lr is set by the protocol"),
        (["--report-only"], "--db: expected the stored runs of a session for --report-only, got no file"),
        (["--grpo-updates", "0", "1"], "--grpo-updates: expected integers >= 1"),
        (["--report-only", "--adopt", "abc"], "--adopt: retrains a run to check the stored ones"),
    ],
)
def test_bad_input_fails_with_one_line_before_anything_starts(tmp_path, args, says):
    db = tmp_path / "runs.db"
    done = run_bench(*args, "--db", str(db))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and says in done.stderr
    assert not db.exists() and done.stdout == ""


def test_the_default_plan_follows_the_protocol(tmp_path):
    """toy_skills (usable warm starts, eval never in the warm start's data), a budget of 120 real steps (more than 8 ×
    the latest first projection: step 5 at m = 5, `auto` gates cycle 1 on its halves), an eval every m on 500
    prompts; skipping arms are evaluated around their phases instead of by the job's periodic eval, lookahead (a
    reposition inside every step) on GRPO's cadence."""
    from step_savings import DEFAULT_STRATEGIES, Runs, Store, make_plan, parse_args

    plan = make_plan(parse_args(["--db", str(tmp_path / "runs.db")]))
    s = plan.settings
    assert s.task == ("toy_skills",)
    assert (s.steps, s.eval_every, s.eval_prompts, plan.deviations) == (120, 5, 500, [])
    assert set(s.tune_seeds).isdisjoint(s.seeds) and len(s.seeds) >= 3
    assert list(s.strategies) == list(DEFAULT_STRATEGIES) and set(plan.cycles) == set(DEFAULT_STRATEGIES) - {
        "lookahead-k3",
        "lookahead-k15",
    }
    runs = Runs(plan, Store(tmp_path / "runs.db"), live=False)
    assert s.grpo_updates == (1, 2, 4)
    grpo = runs.protocol_overrides("grpo", 2e-4, 1)
    grpo_u4 = runs.protocol_overrides("grpo-u4", 1e-4, 1)
    assert "trainer.updates_per_batch=4" in grpo_u4 and "trainer.eval_every=5" in grpo_u4
    extra = runs.protocol_overrides("auto-m5n15-top5", 1e-4, 1)
    lookahead = runs.protocol_overrides("lookahead-k3", 1e-4, 1)
    assert "trainer.eval_every=5" in grpo and "schedule=rl" in grpo and "learner.lr=0.0002" in grpo
    assert not any(o.startswith("trainer.updates_per_batch") for o in grpo)
    assert "trainer.eval_every=0" in extra and extra.index("schedule.eval_around_projection=true") > extra.index(
        "schedule.beta_mode=auto"
    )
    assert "trainer.eval_every=5" in lookahead and "schedule.strategy=lookahead" in lookahead
    assert not any(o.startswith("schedule.eval_around_projection") for o in lookahead)


def test_a_budget_below_eight_first_projections_is_a_deviation_and_lookahead_alone_keeps_the_default(tmp_path):
    from step_savings import make_plan, parse_args

    db = ["--db", str(tmp_path / "runs.db")]
    short = make_plan(parse_args([*db, "--task", "toy_add", "--steps", "30"]))
    assert short.settings.steps == 30 and short.deviations == ["budget 30 < 8 x the latest first-projection step (5)"]
    alone = make_plan(parse_args([*db, "--strategies", "lookahead-k3"]))  # m = 1: 8 × 1 would be an 8-step budget
    assert alone.settings.steps == 120 and alone.deviations == []


def test_the_lookahead_knob_rows_compose_and_run_on_grpos_cadence(tmp_path):
    """The rows that bracket SFPO's K and α around its defaults are valid configs (α = 1 included: no pull-back) and,
    like lookahead-k3, are evaluated on the common cadence, not around phases."""
    from step_savings import STRATEGIES, compose_arm, make_plan, parse_args

    knobs = ["lookahead-k1", "lookahead-k3", "lookahead-k5", "lookahead-k3-a0.6", "lookahead-k3-a1"]
    plan = make_plan(parse_args(["--db", str(tmp_path / "runs.db"), "--strategies", *knobs]))
    assert plan.cycles == {} and plan.settings.eval_every == 5 and plan.deviations == []
    got = {
        row: (cfg.schedule.strategy, cfg.schedule.lookahead_steps, cfg.schedule.lookahead_alpha, cfg.schedule.m)
        for row in knobs
        for cfg in [compose_arm(("toy_skills",), STRATEGIES[row])]
    }
    assert got == {
        "lookahead-k1": ("lookahead", 1, 0.8, 1),
        "lookahead-k3": ("lookahead", 3, 0.8, 1),
        "lookahead-k5": ("lookahead", 5, 0.8, 1),
        "lookahead-k3-a0.6": ("lookahead", 3, 0.6, 1),
        "lookahead-k3-a1": ("lookahead", 3, 1.0, 1),
    }


def settings_for(seeds: tuple[int, ...]):
    from step_savings import STRATEGIES, Settings

    return Settings(
        task=("toy_add",),
        tune_seeds=(0,),
        seeds=seeds,
        strategies={"extra-m5n15-top5": STRATEGIES["extra-m5n15-top5"]},
        grpo_updates=(1,),
        grpo_lrs=(1e-4, 2e-4, 4e-4),
        strategy_lrs=(1e-4,),
        steps=40,
        eval_every=5,
        eval_prompts=500,
        max_extensions=2,
        unstable_drop=0.1,
        target_fraction=0.9,
        code="abc1234",
        train_code="abc1234",
    )


def test_a_run_is_found_by_its_training_code_and_overrides_and_a_missing_one_is_refused_naming_what_differs(tmp_path):
    from mlflow.tracking import MlflowClient
    from step_savings import BenchError, Plan, Runs, Store

    store = Store(tmp_path / "runs.db")
    stored = settings_for((1, 2, 3))
    plan = Plan(stored, {"extra-m5n15-top5": 5}, {"extra-m5n15-top5": 1}, [], tmp_path)
    runs = Runs(plan, store, live=False)

    def key_of(settings, arm="grpo", lr=1e-4, seed=0):
        return Runs(Plan(settings, plan.cycles, plan.passes, [], tmp_path), store, live=False).run_key(arm, lr, seed)

    with pytest.raises(BenchError, match="no stored runs"):
        runs.get("grpo", 1e-4, 0)
    client = MlflowClient(tracking_uri=store.uri)
    run = client.create_run(store.experiment_id, run_name="grpo-lr0.0001-seed0")
    client.set_terminated(run.info.run_id, "FINISHED")
    store.tag(run.info.run_id, stored, "grpo", 1e-4, 0, runs.run_key("grpo", 1e-4, 0))

    assert store.find(runs.run_key("grpo", 1e-4, 0)) == (run.info.run_id, stored.key)
    # another session (other report seeds, another bench version) with the same training code finds the same run
    other = dataclasses.replace(stored, seeds=(4, 5, 6), code="def5678")
    other_runs = Runs(Plan(other, plan.cycles, plan.passes, [], tmp_path), store, live=False)
    assert other_runs.run_key("grpo", 1e-4, 0) == runs.run_key("grpo", 1e-4, 0)
    assert store.find(other_runs.run_key("grpo", 1e-4, 0))[0] == run.info.run_id
    # a run's key changes with its training code, its overrides, its lr and its seed
    keys = {
        key_of(dataclasses.replace(stored, train_code="fed4321")),
        key_of(dataclasses.replace(stored, steps=41)),
        key_of(stored, arm="grpo-u2"),
        key_of(stored, lr=2e-4),
        key_of(stored, seed=1),
        key_of(stored),
    }
    assert len(keys) == 6
    # a run the replay needs and the store lacks: what differs from the newest stored session, on one line
    with pytest.raises(BenchError) as refused:
        other_runs.get("grpo", 2e-4, 0)
    says = str(refused.value)
    assert "lacks grpo lr=0.0002 seed 0" in says and "seeds [1, 2, 3] (here [4, 5, 6])" in says and "\n" not in says
    assert "code 'abc1234' (here 'def5678')" in says
    with pytest.raises(BenchError, match=r"lacks grpo lr=0.0002 seed 0 .*\(its session was interrupted\?\)"):
        runs.get("grpo", 2e-4, 0)

    # --fresh: a live session trains a run even when one of its key is stored
    class Trained(Exception):
        pass

    def train(arm, lr, seed):
        raise Trained(arm, lr, seed)

    fresh = Runs(plan, store, live=True, fresh=True)
    fresh.train = train
    with pytest.raises(Trained) as trained:
        fresh.get("grpo", 1e-4, 0)
    assert trained.value.args == ("grpo", 1e-4, 0)


# --------------------------------------------------------------------------------------------- end to end


TINY_TASK = [
    "data.toy.digits=1",
    "data.toy.num_train=2000",
    "data.toy.num_eval=40",
    "model.warm_start.steps=30",  # the machinery, not the accuracy, is under test
    "model.warm_start.batch_size=64",
    "trainer.prompts_per_step=8",
    "trainer.samples_per_prompt=4",
    "trainer.eval_samples=2",
    "learner.micro_batch_size=16",
    "rollout.kv_cache_mb=16",
    "reward.num_workers=1",
]


@pytest.mark.slow
def test_a_tiny_session_runs_end_to_end_and_its_report_replays_from_the_store(tmp_path):
    """GRPO at μ 1 and 2 and one strategy, one lr each, one tuning and one report seed, 10 real steps (a projection at
    step 5): five real jobs; then --report-only gives the same result from MLflow, and refuses other seeds."""
    from step_savings import BenchError, main

    args = [
        *("--task", *TINY_TASK),
        *("--strategies", "extra-m5n15-top5", "--tune-seeds", "0", "--seeds", "1"),
        *("--grpo-lrs", "1e-4", "--strategy-lrs", "1e-4", "--max-extensions", "0", "--steps", "10"),
        *("--grpo-updates", "1", "2"),
        *("--eval-prompts", "16", "--db", str(tmp_path / "runs.db"), "--cache-dir", str(tmp_path / "cache")),
        *("--plot", str(tmp_path / "plot.png"), "--unstable-drop", "0.99"),  # 16 prompts × 2 samples: noisy evals
    ]
    result = main(args)
    assert result["metric"] == "real_step_ratio_vs_best_grpo" and result["strategy"] == "extra-m5n15-top5"
    assert result["value_kind"] in ("exact", "lower", "upper", "unknown") and result["goal"] == 2
    assert result["timing"]["runs"] == 5  # GRPO at the strategy's lr is GRPO-best's run
    assert result["grids"]["grpo"]["stopped"].startswith("not bracketed after 0 added lr(s)")
    assert set(result["grids"]) == {"grpo", "grpo-u2", "extra-m5n15-top5"}
    assert result["grpo_updates"]["updates"] == [1, 2] and result["grpo_best_updates"] in (1, 2)
    assert set(result["timing"]["step_s_by_arm"]) == {"grpo", "grpo-u2", "extra-m5n15-top5"}
    assert any("report seed" in d for d in result["deviations"])
    extra = result["curves"]["extra-m5n15-top5@0.0001-seed1"]
    assert [p[0] for p in extra] == [0, 5, 5, 10]  # the phase at step 5: an eval before and after it
    assert extra[2][1] >= extra[1][1]  # the phase's seconds count from the second point on
    row = result["strategies"]["extra-m5n15-top5"]
    assert sum(row["projections"].values()) == 1 and 0 < row["cycle_overhead_frac"]
    assert Path(result["plot"]).exists()

    replayed = main([*args, "--report-only"])
    assert {k: v for k, v in replayed.items() if k != "bench_wall_s"} == {
        k: v for k, v in result.items() if k != "bench_wall_s"
    }
    # a live session of other settings that need the same runs (another instability rule) trains none of them
    other = main([*args, "--unstable-drop", "0.98"])
    assert other["session"] != result["session"] and other["timing"]["reused"] == {result["session"]: 5}
    assert other["curves"] == result["curves"] and other["value"] == result["value"]
    # the same runs keyed at another training code (as after a commit): --adopt retrains one of them, finds the same
    # eval curve, and keys the session's runs to today's code; nothing else is retrained
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs.db'}")
    store_runs = client.search_runs(
        [client.get_experiment_by_name("bench-step-savings").experiment_id], "tags.bench_session != ''"
    )
    for r in store_runs:
        client.set_tag(r.info.run_id, "bench_run", "older-code-" + r.data.tags["bench_run"])
    adopted = main([*args, "--adopt", result["session"]])
    assert adopted["curves"] == result["curves"] and adopted["value"] == result["value"]
    tags = [r.data.tags for r in client.search_runs([store_runs[0].info.experiment_id], "tags.bench_session != ''")]
    assert len(tags) == 6 and sum("bench_run_adopted" in t for t in tags) == 5  # the five, and the one retrained
    # every named session is checked before anything trains: one that cannot be adopted refuses before the one that can
    # is retrained
    with pytest.raises(BenchError, match=r"--adopt: no finished runs of session no-such-session in "):
        main([*args, "--adopt", result["session"], "no-such-session"])
    assert len(client.search_runs([store_runs[0].info.experiment_id], "tags.bench_session != ''")) == 6

    # --adopt stale finds the sessions with runs under older keys itself; two sessions that hold the same cheapest run
    # (here: the retrained one moved to a session of its own) share one retrain
    def stored() -> list:
        return client.search_runs([store_runs[0].info.experiment_id], "tags.bench_session != ''")

    twin = next(r for r in stored() if "bench_run_adopted" not in r.data.tags)
    client.set_tag(twin.info.run_id, "bench_session", "split-off")
    for r in stored():
        client.set_tag(r.info.run_id, "bench_run", "older-code-" + r.data.tags["bench_run"])
    again = main([*args, "--adopt", "stale"])
    assert again["curves"] == result["curves"]
    tags = [r.data.tags for r in stored()]
    assert len(tags) == 7 and not any(t["bench_run"].startswith("older-code-") for t in tags)  # one retrain for two
    assert main([*args, "--adopt", "stale"])["curves"] == result["curves"] and len(stored()) == 7  # none stale now
    with pytest.raises(BenchError, match=r"seeds \[1\] \(here \[2\]\)"):
        main([*args[: args.index("--seeds") + 1], "2", *args[args.index("--seeds") + 2 :], "--report-only"])
