"""The extrapolator's decisions (actors/extrapolator.py), pure: no Ray, no engines."""

from __future__ import annotations

import math

import pytest

from actors.extrapolator import ExtrapolationPolicy
from orchestrator.config import ScheduleConfig, check_fields


def schedule(**kw) -> ScheduleConfig:
    """A checked schedule config (m = n = 10, β from the schedule unless kw says otherwise)."""
    cfg = ScheduleConfig(**{"m": 10, "n": 10, "beta_mode": "schedule", **kw})
    check_fields(cfg, "schedule")
    return cfg


def policy(**kw) -> ExtrapolationPolicy:
    return ExtrapolationPolicy(schedule(**kw))


def test_schedule_beta_per_anchor_mode():
    assert policy(beta_mode="schedule").betas() == [2.0]
    assert policy(beta_mode="schedule", m=4, n=6).betas() == [2.5]
    assert policy(beta_mode="schedule", anchor="previous_step", n=5).betas() == [6.0]  # one step stretched over 5 more
    assert policy(beta_mode="fixed", beta=1.3).betas() == [1.3]
    with pytest.raises(ValueError, match="schedule.beta"):
        policy(beta_mode="fixed")
    with pytest.raises(ValueError, match="beta_mode"):
        policy(beta_mode="sometimes")


def test_line_search_candidates_are_above_one():
    p = policy(beta_mode="adaptive", candidates=[0.25, 0.5, 0.75, 1.0], beta=4.0)
    assert p.betas() == [1.0 * 2, 3.0, 4.0]  # 0.25 · 4 = 1 is "not projecting": not a candidate
    assert policy(beta_mode="adaptive", candidates=[0.1], beta=2.0).betas() == [2.0]  # nothing above 1: β_max


def test_auto_gate_needs_drift_share_and_optional_r2():
    p = policy(beta_mode="auto", monitor_threshold=0.7)
    assert p.gate(0.8, math.nan) == (True, "")
    ok, why = p.gate(0.5, 0.9)
    assert not ok and "drift share 0.500 < 0.7" in why
    assert not p.gate(math.nan, 0.9)[0], "the first cycle has no previous displacement: never projects"
    p = policy(beta_mode="auto", monitor_threshold=0.7, monitor_r2=0.8)
    assert not p.gate(0.9, 0.5)[0] and p.gate(0.9, 0.85)[0]
    assert policy(beta_mode="schedule").gate(math.nan, math.nan)[0], "non-auto modes always project"


@pytest.mark.parametrize("mode", ["adaptive", "auto"])
def test_line_search_never_keeps_a_beta_below_not_projecting(mode):
    p = policy(beta_mode=mode)
    assert p.choose(0.50, {1.5: 0.55, 2.0: 0.60}).beta == 2.0
    assert p.choose(0.50, {1.5: 0.58, 2.0: 0.52}).beta == 1.5
    d = p.choose(0.50, {1.5: 0.49, 2.0: 0.50})  # a tie with β = 1 is not a gain
    assert d.beta is None and "no candidate beat beta=1" in d.reasons[0]
    assert not d.guard_fired, "no gain is not a fault: β must not shrink for it"
    assert p.choose(0.5, {1.5: 0.6, 2.0: 0.6}).beta == 1.5, "ties go to the smaller step"
    # property: whatever the rewards, a kept β validates strictly above β = 1
    import random

    rng = random.Random(0)
    for _ in range(500):
        before = rng.random()
        tried = {b: rng.random() for b in (1.25, 1.5, 2.0)}
        d = p.choose(before, tried)
        assert d.beta is None or (tried[d.beta] > before and tried[d.beta] == max(tried.values()))


def test_guard_margin_and_nan_and_shrink():
    p = policy(beta_mode="fixed", beta=3.0, guard_margin=0.05)
    assert p.choose(0.60, {3.0: 0.56}).beta == 3.0  # within the margin
    d = p.choose(0.60, {3.0: 0.50})
    assert d.beta is None and "rolled back" in d.reasons[-1] and d.guard_fired
    d = p.choose(None, {3.0: -math.inf})
    assert d.beta is None and "non-finite" in d.reasons[0] and d.guard_fired
    p.on_rollback()
    assert p.beta_max == pytest.approx(2.0) and p.betas() == [2.0]  # 1 + (3 − 1) · 0.5
    q = policy(beta_mode="fixed", beta=3.0)
    q.load_state(p.state())
    assert q.beta_max == pytest.approx(2.0)


def test_needs_validation():
    assert not schedule(m=1, n=1, beta_mode="schedule").needs_validation
    assert schedule(m=1, n=1, beta_mode="auto").needs_validation
    assert schedule(m=1, n=1, beta_mode="fixed", beta=2, guard_margin=0.1).needs_validation
