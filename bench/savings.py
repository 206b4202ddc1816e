"""The arithmetic of the step-savings protocol (bench/step_savings.py): pure functions over eval curves, no I/O.

A run's curve is its eval points in order, each `Point(step, compute_s, acc)`: real RL steps done, seconds spent in
RL steps and extrapolation phases up to that eval (evals themselves not counted), and eval Avg@k. An RL-Extra run
has two points at each cycle boundary, before and after the extrapolation phase (equal accuracy when nothing was
projected).

Choices, each a function below:
- `build_curve`: a run's points from the job's own evals, its steps' seconds and its extrapolation phases.
- `first_hit`: the cost (real steps, or compute seconds) at the first eval at or above the target. A run that never
  gets there is *censored*: its cost is known only to exceed the cost at its last eval (the budget).
- `target_acc`: `fraction` (0.9) of the way from a seed's warm-start accuracy to GRPO-best's median final accuracy.
- `ratio_bounds`: reference cost ÷ candidate cost as an interval [lo, hi]: exact when both reach the target,
  `≤ ref / budget` when the candidate is censored, `≥ budget / cand` when the reference is, [0, ∞] when both are.
  Both reaching it at step 0 (a warm start already at the target) is exactly 1: no steps to save.
- `median_bounds`: the median of intervals is the interval of the medians of their ends (the median is monotone in
  every argument), so a censored ratio enters the median as a bound and the headline says which.
- `gain_area`: area between the curve and the warm-start accuracy over [0, budget] real steps (trapezoids).
- `is_unstable`: a non-finite loss, or a final accuracy more than `drop` below the run's best eval (the warm start
  included, so a run that ends well below where it started is unstable too).
- `ends_below`: the issue's "never ends below GRPO" test: a run's final accuracy is below the reference's by more
  than one eval standard error, √(p (1 − p) / prompts) at the reference's final p (an Avg@k over k samples per
  prompt varies no more than one sample does, so this SE is an upper bound).
- `bracket`: an lr grid's best stable lr is bracketed when the lr on each side of it in the grid is worse or
  unstable; otherwise the next lr to try lies one `factor` beyond the open edge of the grid. `grow_grid` adds such
  lrs one at a time until the best is bracketed or a limit is reached, and says why it stopped.
- `bracket_updates`: the same for GRPO's optimizer steps per rollout batch (μ), each μ scored by its own best stable
  lr; μ = 1 closes the low side by itself, and the grid doubles beyond its top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INF = math.inf


@dataclass(frozen=True)
class Point:
    step: int  # real RL steps done
    compute_s: float  # seconds in RL steps and extrapolation phases up to this eval (evals excluded)
    acc: float  # eval Avg@k


@dataclass(frozen=True)
class Cost:
    """The cost of reaching the target, or, censored, the cost at the budget (the true cost is larger)."""

    value: float
    censored: bool

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.value, INF) if self.censored else (self.value, self.value)


@dataclass(frozen=True)
class Bound:
    """A ratio known to lie in [lo, hi] (lo == hi: exact)."""

    lo: float
    hi: float

    @property
    def exact(self) -> bool:
        return self.lo == self.hi

    @property
    def kind(self) -> str:
        """exact | lower (a lower bound: the true value is at least lo) | upper | unknown."""
        if self.exact:
            return "exact"
        if self.hi == INF:
            return "unknown" if self.lo == 0 else "lower"
        return "upper"

    def __str__(self) -> str:
        return {
            "exact": f"{self.lo:.2f}",
            "lower": f">={self.lo:.2f}",
            "upper": f"<={self.hi:.2f}",
            "unknown": "?",
        }[self.kind]

    def as_json(self) -> dict:
        return {"lo": finite_or_none(self.lo), "hi": finite_or_none(self.hi), "kind": self.kind}


def finite_or_none(x: float | None) -> float | None:
    """JSON has no infinity: an infinite or missing number is null. Four significant digits (not decimals: an lr of
    5e-05 must not read 0.0001)."""
    if x is None or not math.isfinite(x):
        return None
    return x if isinstance(x, int) else float(f"{x:.4g}")


@dataclass(frozen=True)
class Phase:
    """One extrapolation phase at the end of real step `step`, with the evals around it (equal if it projected
    nothing)."""

    step: int
    time_s: float
    acc_before: float
    acc_after: float


def build_curve(evals: dict[int, float], step_s: dict[int, float], phases: Sequence[Phase]) -> list[Point]:
    """A run's curve from the job's own evals ({real step: acc}: step 0, periodic, final), its RL steps' seconds
    ({step: s}) and its extrapolation phases. A phase gives two points at its step, before and after; the job's own
    eval at that step (taken after the phase) repeats the second and is left out."""
    at_phase = {p.step: p for p in phases}
    points, spent, counted = [], 0.0, 0
    for step in sorted(set(evals) | set(at_phase)):
        spent += sum(step_s.get(k, 0.0) for k in range(counted + 1, step + 1))
        counted = step
        phase = at_phase.get(step)
        if phase is None:
            points.append(Point(step, spent, evals[step]))
            continue
        points.append(Point(step, spent, phase.acc_before))
        spent += phase.time_s
        points.append(Point(step, spent, phase.acc_after))
    return points


# ------------------------------------------------------------------------------------------------ target


def target_acc(warm_start: float, grpo_final_median: float, fraction: float = 0.9) -> float:
    """`fraction` of the way from this seed's warm-start accuracy to GRPO-best's median final accuracy."""
    return warm_start + fraction * (grpo_final_median - warm_start)


def first_hit(curve: Sequence[Point], target: float, cost: Callable[[Point], float] = lambda p: p.step) -> Cost:
    """The cost at the first eval whose accuracy is >= target; censored at the last eval's cost when none is."""
    for point in curve:
        if point.acc >= target:
            return Cost(float(cost(point)), censored=False)
    return Cost(float(cost(curve[-1])), censored=True)


# ------------------------------------------------------------------------------------------------ ratios


def _divide(num: float, den: float) -> float:
    """num / den over [0, ∞]: x/∞ = 0, ∞/x = ∞, x/0 = ∞ for x > 0, and 0/0 = 1 (both at the target at step 0)."""
    if den == INF:
        return 0.0 if num != INF else INF
    if den == 0:
        return 1.0 if num == 0 else INF
    return num / den


def ratio_bounds(reference: Cost, candidate: Cost) -> Bound:
    """reference cost ÷ candidate cost (> 1: the candidate needs less), as an interval under censoring."""
    ref_lo, ref_hi = reference.bounds
    cand_lo, cand_hi = candidate.bounds
    return Bound(_divide(ref_lo, cand_hi), _divide(ref_hi, cand_lo))


def median_bounds(bounds: Sequence[Bound]) -> Bound:
    """The median of interval-valued ratios: [median of the lower ends, median of the upper ends]."""
    return Bound(_median([b.lo for b in bounds]), _median([b.hi for b in bounds]))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    if len(xs) % 2:
        return xs[mid]
    a, b = xs[mid - 1], xs[mid]
    return INF if INF in (a, b) else (a + b) / 2


# ------------------------------------------------------------------------------------------ curve summaries


def gain_area(curve: Sequence[Point], warm_start: float) -> float:
    """∫ (acc − warm start) d(real step) over the curve, by trapezoids (a projection's two points at one step add
    nothing by themselves; the segment after it starts from the post-projection accuracy)."""
    return sum((b.step - a.step) * ((a.acc + b.acc) / 2 - warm_start) for a, b in zip(curve, curve[1:], strict=False))


def area_ratio(candidate: float, reference: float) -> float | None:
    """candidate's gain area ÷ the reference's; None when the reference gained nothing (the ratio means nothing)."""
    return candidate / reference if reference > 0 else None


def eval_se(acc: float, prompts: int) -> float:
    """One standard error of an eval's accuracy `acc` over `prompts` prompts (binomial)."""
    return math.sqrt(max(acc * (1.0 - acc), 0.0) / prompts)


def ends_below(final: float, reference_final: float, prompts: int) -> bool:
    """Does a run end below the reference by more than one eval standard error at the reference's accuracy?"""
    return reference_final - final > eval_se(reference_final, prompts)


def is_unstable(curve: Sequence[Point], drop: float, finite_loss: bool = True) -> bool:
    """Unstable: a non-finite loss, or a final accuracy more than `drop` below the run's best eval, the step-0 eval
    (the warm start) included: the run reached an accuracy it could not keep, or fell below where it started.
    `drop` must exceed what eval noise alone gives between the best and the last of a run's evals."""
    final, best = curve[-1].acc, max(p.acc for p in curve)
    return not finite_loss or final < best - drop


# --------------------------------------------------------------------------------------------- lr brackets


@dataclass(frozen=True)
class LrScore:
    lr: float
    score: float  # higher is better (the median gain area over the tuning seeds)
    unstable: bool


@dataclass(frozen=True)
class Bracket:
    best: LrScore | None  # the best stable lr (None: every lr tried was unstable)
    bracketed: bool
    next_lr: float | None  # the lr to try next (None when bracketed)
    reason: str


def bracket(grid: Sequence[LrScore], factor: float = 2.0) -> Bracket:
    """Is the best stable lr interior (the lr below it worse or unstable, the one above it worse or unstable)?

    If not, the next lr lies `factor` beyond the grid's edge on the open side: below the smallest lr when every lr is
    unstable or nothing worse lies below the best, else above the largest."""
    rs = sorted(grid, key=lambda r: r.lr)
    stable = [r for r in rs if not r.unstable]
    if not stable:
        return Bracket(None, False, rs[0].lr / factor, f"every lr tried is unstable: try {rs[0].lr / factor:.3g}")
    best = max(stable, key=lambda r: (r.score, -r.lr))  # ties: the smaller lr
    i = rs.index(best)
    below, above = (rs[i - 1] if i > 0 else None), (rs[i + 1] if i + 1 < len(rs) else None)

    def closes(r: LrScore | None) -> bool:
        return r is not None and (r.unstable or r.score < best.score)

    if closes(below) and closes(above):
        sides = [f"{r.lr:.3g} {'unstable' if r.unstable else f'worse ({r.score:.3g})'}" for r in (below, above)]
        return Bracket(best, True, None, f"best {best.lr:.3g} ({best.score:.3g}) between {sides[0]} and {sides[1]}")
    if not closes(below):
        nxt = rs[0].lr / factor
        return Bracket(best, False, nxt, f"nothing worse below the best {best.lr:.3g}: try {nxt:.3g}")
    nxt = rs[-1].lr * factor
    return Bracket(best, False, nxt, f"nothing worse or unstable above the best {best.lr:.3g}: try {nxt:.3g}")


@dataclass(frozen=True)
class Grid:
    """An lr grid after growing: every lr's score, the best stable lr, and why the grid stopped growing."""

    scores: tuple[LrScore, ...]  # by lr
    best: LrScore | None
    bracketed: bool
    reason: str

    def as_json(self) -> dict:
        return {
            "lrs": [s.lr for s in self.scores],
            "scores": [round(s.score, 4) for s in self.scores],
            "unstable": [s.unstable for s in self.scores],
            "best_lr": self.best.lr if self.best else None,
            "bracketed": self.bracketed,
            "stopped": self.reason,
        }


def grow_grid(
    score: Callable[[float], LrScore],
    initial: Sequence[float],
    max_added: int,
    factor: float = 2.0,
    log: Callable[[str], None] = lambda line: None,
) -> Grid:
    """Score every lr of `initial`, then add one lr at a time where `bracket` says, until the best stable lr is
    bracketed or `max_added` lrs were added (then the grid is reported as not bracketed, with its best so far)."""
    scores = {lr: score(lr) for lr in sorted(initial)}
    for added in range(max_added + 1):
        b = bracket(list(scores.values()), factor)
        if b.bracketed or added == max_added:
            reason = b.reason if b.bracketed else f"not bracketed after {added} added lr(s): {b.reason}"
            return Grid(tuple(sorted(scores.values(), key=lambda s: s.lr)), b.best, b.bracketed, reason)
        log(b.reason)
        scores[b.next_lr] = score(b.next_lr)
    raise AssertionError("unreachable: the loop returns at added == max_added")


@dataclass(frozen=True)
class UpdatesBracket:
    best: int | None  # the μ whose best stable lr scores highest (None: no μ has a stable lr)
    bracketed: bool
    next_updates: int | None  # the μ to try next (None when bracketed or nothing can be added)
    reason: str


def bracket_updates(scores: dict[int, float | None]) -> UpdatesBracket:
    """GRPO's μ (optimizer steps per rollout batch) → the score of its best stable lr (None: every lr unstable). The
    best μ is bracketed when the μ on each side of it is worse or has no stable lr; μ = 1 closes the low side (there
    is no fewer), so does a μ below the grid's smallest that halving cannot reach. Else the next μ is twice the
    largest (the open side is the top) or half the smallest. Ties: the smaller μ (fewer passes, cheaper)."""
    us = sorted(scores)
    stable = [u for u in us if scores[u] is not None]
    if not stable:
        return UpdatesBracket(None, False, None, f"no μ of {us} has a stable lr")
    best = max(stable, key=lambda u: (scores[u], -u))
    i = us.index(best)

    def closes(j: int) -> bool:
        return 0 <= j < len(us) and (scores[us[j]] is None or scores[us[j]] < scores[best])

    low_closed = best == 1 or closes(i - 1)
    if low_closed and closes(i + 1):
        return UpdatesBracket(best, True, None, f"best μ {best} ({scores[best]:.3g}), its neighbours worse")
    if not low_closed:
        nxt = max(1, us[0] // 2)
        return UpdatesBracket(best, False, nxt, f"nothing worse below the best μ {best}: try {nxt}")
    nxt = us[-1] * 2
    return UpdatesBracket(best, False, nxt, f"nothing worse above the best μ {best}: try {nxt}")
