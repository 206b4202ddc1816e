"""The extrapolator's decisions (actors/extrapolator.py), pure: no Ray, no engines."""

from __future__ import annotations

import math

import pytest

from actors.extrapolator import Candidate, ExtrapolationPolicy
from linearity.validation import PairedGain
from orchestrator.config import ScheduleConfig, check_fields


def schedule(**kw) -> ScheduleConfig:
    """A checked schedule config (m = n = 10, β from the schedule unless kw says otherwise)."""
    cfg = ScheduleConfig(**{"m": 10, "n": 10, "beta_mode": "schedule", **kw})
    check_fields(cfg, "schedule")
    return cfg


def policy(**kw) -> ExtrapolationPolicy:
    return ExtrapolationPolicy(schedule(**kw))


def candidate(beta: float, gain: float, accepted: bool) -> Candidate:
    return Candidate(beta, True, PairedGain(gain, 3.0 if accepted else 0.5, 32, 2.0, accepted))


def test_schedule_beta_per_anchor_mode_and_strategy():
    assert policy(beta_mode="schedule").betas() == [2.0]
    assert policy(beta_mode="schedule", m=4, n=6).betas() == [2.5]
    assert policy(beta_mode="schedule", anchor="previous_step", n=5).betas() == [6.0]  # one step stretched over 5 more
    assert policy(beta_mode="fixed", beta=1.3).betas() == [1.3]
    assert policy(beta_mode="schedule", strategy="rank1").betas() == [2.0]
    assert policy(beta_mode="fixed", strategy="lookahead", m=1, lookahead_alpha=0.8).betas() == [0.8]  # SFPO's α
    with pytest.raises(ValueError, match="schedule.beta"):
        policy(beta_mode="fixed")
    with pytest.raises(ValueError, match="beta_mode"):
        policy(beta_mode="sometimes")


def test_lookahead_config_is_checked():
    with pytest.raises(ValueError, match=r"schedule.m: expected 1 for strategy=lookahead"):
        policy(strategy="lookahead")
    with pytest.raises(ValueError, match=r"schedule.beta: expected null for strategy=lookahead"):
        policy(strategy="lookahead", m=1, beta=2.0)
    with pytest.raises(ValueError, match=r"velocity=two_point"):
        policy(strategy="lookahead", m=1, velocity="least_squares")
    with pytest.raises(ValueError, match=r"lookahead_alpha"):
        policy(strategy="lookahead", m=1, lookahead_alpha=1.5)


def test_line_search_candidates():
    p = policy(beta_mode="adaptive", candidates=[0.25, 0.5, 0.75, 1.0], beta=4.0)
    assert p.betas() == [1.0 * 2, 3.0, 4.0]  # 0.25 · 4 = 1 is "not projecting": not a candidate
    assert policy(beta_mode="adaptive", candidates=[0.1], beta=2.0).betas() == [2.0]  # nothing above 1: β_max
    la = policy(beta_mode="auto", strategy="lookahead", m=1, lookahead_alpha=0.8, candidates=[0.5, 1.0, 1.5])
    assert la.betas() == [0.4, 0.8]  # α candidates stay in (0, 1]: 1.2 would move past the fast weights


def test_auto_gate_needs_drift_share_and_optional_r2():
    p = policy(beta_mode="auto", monitor_threshold=0.7)
    assert p.gate(0.8, math.nan, math.nan) == (True, "")
    ok, why = p.gate(0.5, math.nan, 0.9)
    assert not ok and "drift share 0.500 < 0.7" in why
    p = policy(beta_mode="auto", monitor_threshold=0.7, monitor_r2=0.8)
    assert not p.gate(0.9, math.nan, 0.5)[0] and p.gate(0.9, math.nan, 0.85)[0]
    assert policy(beta_mode="schedule").gate(math.nan, math.nan, math.nan)[0], "non-auto modes always project"
    assert policy(beta_mode="auto", strategy="lookahead", m=1).gate(math.nan, math.nan, math.nan)[0]


def test_first_cycle_gate_reads_the_halves_of_the_cycle():
    """The first cycle has no previous displacement (cross-cycle drift share NaN): the drift share between its two
    halves decides instead — linear within the cycle passes, a random walk does not, a cycle too short to halve
    (NaN) does not."""
    p = policy(beta_mode="auto", monitor_threshold=0.7)
    ok, why = p.gate(math.nan, 0.85, math.nan)
    assert ok and why == ""
    ok, why = p.gate(math.nan, 0.2, math.nan)
    assert not ok and "drift share of the cycle's halves 0.200 < 0.7" in why
    assert not p.gate(math.nan, math.nan, math.nan)[0]
    assert not p.gate(0.3, 0.95, math.nan)[0], "after the first cycle the cross-cycle reading decides"


@pytest.mark.parametrize("mode", ["adaptive", "auto"])
def test_only_an_accepted_candidate_is_kept(mode):
    p = policy(beta_mode=mode)
    assert p.choose([candidate(1.5, 0.01, True), candidate(2.0, 0.02, True)]).beta == 2.0
    assert (
        p.choose([candidate(1.5, 0.02, True), candidate(2.0, 0.05, False)]).beta == 1.5
    )  # the larger gain is not significant
    d = p.choose([candidate(1.5, 0.01, False), candidate(2.0, 0.02, False)])
    assert d.beta is None and "no candidate passed the validation test" in d.reasons[0]
    assert not d.guard_fired, "no significant gain is not a fault: β must not shrink for it"
    assert p.choose([candidate(1.5, 0.03, True), candidate(2.0, 0.03, True)]).beta == 1.5, "ties go to the smaller step"


def test_guard_margin_and_nan_and_shrink():
    p = policy(beta_mode="fixed", beta=3.0, guard_margin=0.05)
    assert p.choose([candidate(3.0, -0.04, False)]).beta == 3.0  # within the margin
    d = p.choose([candidate(3.0, -0.1, False)])
    assert d.beta is None and "rolled back" in d.reasons[-1] and d.guard_fired
    d = p.choose([Candidate(3.0, False)])
    assert d.beta is None and "non-finite" in d.reasons[0] and d.guard_fired
    p.on_rollback()
    assert p.beta_max == pytest.approx(2.0) and p.betas() == [2.0]  # 1 + (3 − 1) · 0.5
    q = policy(beta_mode="fixed", beta=3.0)
    q.load_state(p.state())
    assert q.beta_max == pytest.approx(2.0)
    auto = policy(beta_mode="auto", guard_margin=0.05)
    d = auto.choose([candidate(1.5, -0.2, False), candidate(2.0, -0.3, False)])
    assert d.guard_fired, "auto: every candidate collapsing the reward is a fault, not a tie"
    assert policy(beta_mode="schedule").choose([Candidate(2.0, True)]).beta == 2.0  # no validation: the single β


def test_lookahead_shrinks_alpha_toward_the_slow_weights_and_switches_off_on_an_entropy_spike():
    p = policy(beta_mode="fixed", strategy="lookahead", m=1, lookahead_alpha=0.8, entropy_window=3, entropy_z=1.0)
    p.on_rollback()
    assert p.beta_max == pytest.approx(0.4) and p.betas() == [0.4]
    assert p.observe_entropy(1.0) and p.observe_entropy(0.9) and p.observe_entropy(0.8)
    assert not p.observe_entropy(1.5), "z of the spike within the window >= 1: SFPO off"
    assert not p.observe_entropy(0.5), "off for good"
    q = policy(beta_mode="fixed", strategy="lookahead", m=1, entropy_window=3)
    q.load_state(p.state())
    assert q.beta_max == pytest.approx(0.4) and not q.entropy.on


def test_needs_validation():
    assert not schedule(m=1, n=1, beta_mode="schedule").needs_validation
    assert schedule(m=1, n=1, beta_mode="auto").needs_validation
    assert schedule(m=1, n=1, beta_mode="fixed", beta=2, guard_margin=0.1).needs_validation
