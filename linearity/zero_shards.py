"""RL-Extra on the learner side: project each rank's shard of DeepSpeed's fp32 master weights in place.

Every rank touches only what it owns (no gather), keeps the optimizer state, and refreshes the low-precision
parameters the next forward pass uses (`shared/notes/deepspeed-zero.md`):

| ZeRO stage | fp32 master partition (projected)           | low-precision refresh                           |
|------------|---------------------------------------------|-------------------------------------------------|
| 1, 2       | `optimizer.single_partition_of_fp32_groups` | `optimizer.update_lp_params()` (all-gather)     |
| 1 + bf16   | `optimizer.fp32_groups_flat_partition`      | `optimizer.update_lp_params()` (BF16_Optimizer) |
| 3          | `optimizer.fp32_partitioned_groups_flat`    | copy into `fp16_partitioned_groups_flat`, then  |
|            |                                             | re-gather the persistent (small) params         |

Projecting only the low-precision copy would be undone by the next optimizer step, and projecting only the
master would leave the next forward on old weights; so both, in that order.

Which elements move is decided per parameter by name (`linearity.selection.TensorSelector` include / exclude
globs, norm layers excluded by default, the same rules as the offline `orchestrator.extrapolate`): each
parameter's slice of the local partition is located from DeepSpeed's own offsets, and a boolean mask over the
partition selects it. The anchor (weights at the cycle start) lives with the shard, on the same device (or CPU by
config), one extra copy of the local partition.

Beyond names, the projector keeps cheap statistics with the shard so the extrapolator can decide *whether* and
*what* to project (`shared/notes/toy-linearity.md`: projecting every weight hurt, a selected subset paid):

- the previous cycle's displacement (one more partition copy): the **drift share** cos(d_prev, d_now), per
  parameter and overall, from all-reduced dot products — 1 for steady drift, ≈ 0 for a random walk;
- a fixed sample of elements recorded after every step: the **running R²** of their trajectories in the cycle;
- with `velocity="least_squares"`, a running least-squares line per element (two more copies,
  `linearity.trend.TrendAccumulator`) whose slope replaces the chord (W − A) / m;
- in the first cycle (no previous displacement yet) the displacement of its first half, kept in the buffer that
  later holds the previous cycle's: the **halves' drift share** cos(W_h − A, W − W_h) tells whether the first cycle is
  already linear (at half the span it reads lower than over whole cycles, so the same threshold is stricter).

At the end of a cycle `end_cycle(selection)` computes those statistics and the cycle's masks: `names` (the
include / exclude globs only), `tensor_drift` (parameters whose drift share ≥ a threshold), or `top_elements`
(the top fraction of elements by steady displacement: |W − A| where it moved the same way as in the previous
cycle; by |W − A| alone in the first cycle). The top-fraction threshold is global: ranks all-gather a uniform
sample of their scores (partitions are equal-sized, so equal per-rank samples are a uniform global sample).

Strategies (`strategy`, orchestrator/config.py ScheduleConfig): `extrapolate` projects the masked elements along the
chord or the least-squares slope; `rank1` (linearity.rank1) finds, at `end_cycle`, the rank-1 direction σ u vᵀ of
every name-selected weight matrix's W − A by a power iteration whose partial products are all-reduced (each rank
knows which rows and columns its flat slice of a matrix covers), warm-started from the previous cycle's v, and
`project` adds (β − 1) σ u vᵀ (least_squares: (β − 1) m (uᵀ V v) u vᵀ) to the slices; `lookahead` (SFPO) is the
chord projection with β = α < 1 from the slow weights (its anchor), and `restore_anchor` returns to them.

The math is `linearity.trend` and `linearity.projection`, the functions their unit tests check; this module is
the DeepSpeed adapter: it finds the shard's tensors and per-parameter slices, runs those functions on them,
all-reduces / all-gathers what they return, and hands the reduced sums back to them to finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from linearity.projection import DEFAULT_CHUNK_NUMEL, chunk_bounds, displacement_stats, project_, snapshot_
from linearity.rank1 import Rank1, add_outer_, bilinear, power_iteration, start_vectors
from linearity.selection import DEFAULT_EXCLUDE, TensorSelector
from linearity.trend import (
    TrendAccumulator,
    drift_partial_sums,
    drift_share,
    r2_score,
    steady_displacement,
    top_fraction_mask,
)

SELECTION_MODES = ("names", "tensor_drift", "top_elements")
VELOCITY_MODES = ("two_point", "least_squares")
TOP_SAMPLE_SIZE = 1 << 16  # scores each rank samples for the global top-fraction threshold


class ParamSlice(NamedTuple):
    """The elements of one parameter a rank's master flat holds: flat[start:end] are the parameter's flattened
    (row-major) elements [offset, offset + end − start)."""

    name: str
    start: int
    end: int
    offset: int


@dataclass
class ProjectionStats:
    """One rank's view of a projection (sums are all-reduced over ranks before they are returned)."""

    beta: float
    projected_numel: int  # elements moved, all ranks
    total_numel: int  # elements in the partitions, all ranks
    displacement_norm: float  # ||W - A|| over the projected elements before projection, all ranks
    finite: bool  # every projected value finite on every rank


@dataclass
class CycleStats:
    """The linearity monitor's reading at the end of a cycle and the selection it made (all ranks combined,
    except `r2_values`: this rank's sampled elements, merged by the caller)."""

    steps: int  # RL steps observed since the anchor
    drift_share: float  # cos(d_prev, d_now) over the name-selected elements; NaN in the first cycle
    drift_share_halves: float  # first cycle: cos(W_h − A, W − W_h) of its two halves; NaN otherwise
    drift_share_per_tensor: dict[str, float]  # by parameter name (NaN where a displacement is zero)
    displacement_norm: float  # ||W - A|| over the name-selected elements
    selected_numel: int  # elements the cycle's masks select (all ranks)
    eligible_numel: int  # elements the name globs allow (all ranks)
    selected_tensors: int  # parameters with at least one selected element
    r2_values: list[float] = field(default_factory=list)  # per sampled element (this rank); constants dropped
    rank1_share: float = math.nan  # rank1: Σ σ² / Σ ‖W − A‖² over the matrices (energy along the rank-1 directions)
    rank1_matrices: int = 0  # rank1: weight matrices moved along their rank-1 direction


class ShardProjector:
    """Holds a rank's anchor and statistics and performs snapshot / observe / end_cycle / project / rollback."""

    def __init__(
        self,
        engine,
        stage: int,
        include=("*",),
        exclude=None,
        anchor_device: str | None = None,
        keep_backup: bool = True,
        velocity: str = "two_point",
        monitor_samples: int = 2048,
        seed: int = 0,
        strategy: str = "extrapolate",
        half_steps: int = 0,
    ):
        """
        strategy: extrapolate | rank1 | lookahead (what `project` does; see the module docstring).
        half_steps: in the first cycle, record the displacement after this many steps for the halves' drift share
            (m // 2; 0: never).
        """
        if velocity not in VELOCITY_MODES:
            raise ValueError(f"velocity: expected one of {VELOCITY_MODES}, got {velocity!r}")
        if strategy not in ("extrapolate", "rank1", "lookahead"):
            raise ValueError(f"strategy: expected extrapolate, rank1 or lookahead, got {strategy!r}")
        self.engine = engine
        self.optimizer = engine.optimizer
        self.stage = stage
        self.masters = self._master_flats()
        names = {id(p): n for n, p in engine.module.named_parameters()}
        self.param_names = sorted(set(names.values()))  # the same list on every rank: all-reduce order
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}
        selector = TensorSelector(tuple(include), tuple(DEFAULT_EXCLUDE if exclude is None else exclude))
        self.slices = self._param_slices(names)
        self.name_masks = self._build_masks(selector)
        self.masks = list(self.name_masks)  # the current cycle's selection (names until end_cycle says otherwise)
        device = anchor_device or self.masters[0].device
        self.anchors = [torch.empty_like(m, device=device) for m in self.masters]
        self.backup = [torch.empty_like(m) for m in self.masters] if keep_backup else None
        self.prev = [torch.zeros_like(m, device=device) for m in self.masters]
        self.has_prev = False
        self.has_anchor = False
        self.steps_observed = 0
        self.velocity = velocity
        if velocity == "least_squares" and self.anchors[0].device != self.masters[0].device:
            raise ValueError("velocity=least_squares needs the anchors on the shard's device (anchor_device: null)")
        self.trend = TrendAccumulator(self.anchors) if velocity == "least_squares" else None
        gen = torch.Generator().manual_seed(seed * 7919 + self._rank())
        total = sum(m.numel() for m in self.masters)
        self.sample_index = [
            torch.randint(m.numel(), (max(1, round(monitor_samples * m.numel() / total)),), generator=gen).to(m.device)
            for m in self.masters
        ]
        self.samples: list[torch.Tensor] = []  # float64[S] per observed step: the sampled elements
        self.strategy = strategy
        self.half_steps = half_steps
        self.has_half = False  # prev holds the first cycle's first-half displacement
        # rank1: the name-selected weight matrices (R, prod(rest)), in the same order on every rank
        self.matrices = [n for n in self.param_names if selector.selected(n) and _is_matrix(shapes[n])]
        self.matrix_shapes = [(shapes[n][0], math.prod(shapes[n][1:])) for n in self.matrices]
        self.rank1: Rank1 | None = None  # this cycle's rank-1 parts (end_cycle)
        self.rank1_steps: list[float] = []  # per matrix: the coefficient added along u vᵀ per unit of (β − 1)
        self.rank1_start = start_vectors(self.matrix_shapes, seed * 7919 + 17)  # warm start: the last cycle's v

    # --------------------------------------------------------------------------------- where things live

    @staticmethod
    def _rank() -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def _master_flats(self) -> list[torch.Tensor]:
        opt = self.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            flats = getattr(opt, attr, None)
            if flats:
                return [f for f in flats if f.numel() > 0]
        raise RuntimeError(f"RL-Extra: no fp32 master partitions found on {type(opt).__name__}")

    def _param_slices(self, names: dict) -> list[list[ParamSlice]]:
        """For each master flat: the `ParamSlice` of every parameter this rank owns elements of."""
        opt = self.optimizer
        out: list[list[ParamSlice]] = []
        rank = self._rank()
        if self.stage == 3:
            for group in opt.fp16_groups:
                slices, offset = [], 0
                for p in group:
                    n = p.ds_tensor.numel()
                    valid = max(0, min(n, p.ds_numel - rank * n))  # the last rank's partition is padded
                    slices.append(ParamSlice(names[id(p)], offset, offset + valid, rank * n))
                    offset += n
                out.append(slices)
            return out
        if hasattr(opt, "round_robin_bit16_groups"):  # ZeRO 1/2
            groups, offsets = opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets
            partitions = opt.parallel_partitioned_bit16_groups
        else:  # BF16_Optimizer: params flattened back to back
            groups = opt.bf16_groups
            offsets = [[sum(q.numel() for q in g[:j]) for j in range(len(g))] for g in groups]
            partitions = opt.bf16_partitioned_groups
        for group, offs, parts in zip(groups, offsets, partitions):
            left = sum(t.numel() for t in parts[:rank])
            size = parts[rank].numel()
            slices = []
            for p, off in zip(group, offs):
                s, e = max(off, left), min(off + p.numel(), left + size)
                if s < e:
                    slices.append(ParamSlice(names[id(p)], s - left, e - left, s - off))
            out.append(slices)
        return out

    def _build_masks(self, selector) -> list[torch.Tensor | None]:
        masks: list[torch.Tensor | None] = []
        for flat, group_slices in zip(self.masters, self.slices):
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            for name, s, e, _ in group_slices:
                if selector.selected(name):
                    mask[s:e] = True
            masks.append(None if bool(mask.all()) else mask)
        self.selected_names = sorted({sl.name for g in self.slices for sl in g if selector.selected(sl.name)})
        self.skipped_names = sorted({sl.name for g in self.slices for sl in g if not selector.selected(sl.name)})
        return masks

    def _name_mask(self, i: int) -> torch.Tensor:
        m = self.name_masks[i]
        return (
            m if m is not None else torch.ones(self.masters[i].numel(), dtype=torch.bool, device=self.masters[i].device)
        )

    # ------------------------------------------------------------------------------------------- actions

    @torch.no_grad()  # the master flats are the optimizer's leaf parameters
    def snapshot(self) -> None:
        """Anchor ← current master weights (the start of a cycle); the cycle's statistics restart."""
        snapshot_(self.anchors, self.masters)
        self.has_anchor = True
        self.steps_observed = 0
        self.has_half = False
        self.masks = list(self.name_masks)
        self.samples = []
        if self.trend is not None:
            self.trend.reset()
            self.trend.update(self.masters, 0.0)
        self._record_sample()

    @torch.no_grad()
    def observe(self) -> None:
        """After every optimizer step inside a cycle: feed the trend and the R² sample."""
        if not self.has_anchor:
            return
        self.steps_observed += 1
        if self.trend is not None:
            self.trend.update(self.masters, float(self.steps_observed))
        self._record_sample()
        if not self.has_prev and self.half_steps and self.steps_observed == self.half_steps:
            torch._foreach_copy_(self.prev, self.masters)  # the first half's displacement W_h − A
            torch._foreach_sub_(self.prev, self.anchors)
            self.has_half = True

    def _record_sample(self) -> None:
        self.samples.append(torch.cat([m[i].double().cpu() for m, i in zip(self.masters, self.sample_index)]))

    @torch.no_grad()
    def end_cycle(
        self, selection: str = "names", threshold: float = 0.7, fraction: float = 0.1, rank1_iters: int = 8
    ) -> CycleStats:
        """The monitor's reading and this cycle's masks (rank1: also the rank-1 parts, by `rank1_iters` power
        iterations); then d_prev ← d_now. A collective (same args on every rank)."""
        if selection not in SELECTION_MODES:
            raise ValueError(f"selection: expected one of {SELECTION_MODES}, got {selection!r}")
        if not self.has_anchor:
            raise RuntimeError("RL-Extra: end_cycle() before snapshot()")
        # Rows of parameters outside the name globs are zero on every rank; d_prev is zero before the first
        # cycle ends, which makes every drift share NaN.
        halves = self.has_half and not self.has_prev
        drift = drift_share(self._all_reduce(self._drift_partial_sums(halves=False)))
        drift_halves = math.nan
        if halves:  # prev holds the first half, not a previous cycle: no cross-cycle reading yet
            drift_halves = drift_share(self._all_reduce(self._drift_partial_sums(halves=True))).total
            drift = drift._replace(per_tensor=[math.nan] * len(drift.per_tensor), total=math.nan)
        per_tensor = dict(zip(self.param_names, drift.per_tensor))
        rank1_share, rank1_matrices = math.nan, 0
        if self.strategy == "rank1":
            self.masks = self._masks_for_names(set(self.matrices))
            rank1_share, rank1_matrices = self._find_rank1(rank1_iters)
        elif selection == "names":
            self.masks = list(self.name_masks)
        elif selection == "tensor_drift":
            keep = {n for n, v in per_tensor.items() if v >= threshold}  # NaN (first cycle) keeps nothing
            self.masks = self._masks_for_names(keep)
        else:
            self.masks = self._top_element_masks(fraction)
        eligible = sum(int(self._name_mask(i).sum()) for i in range(len(self.masters)))
        counts = self._all_reduce([self._projected_numel(), eligible]).tolist()
        holding = self._names_with_selected()
        selected_tensors = self._all_reduce([1.0 if n in holding else 0.0 for n in self.param_names]).tolist()
        r2 = self._sample_r2()
        # d_prev ← d_now, for the next cycle's drift share and consistency
        torch._foreach_copy_(self.prev, self.masters)
        torch._foreach_sub_(self.prev, self.anchors)
        self.has_prev = True
        self.has_half = False
        return CycleStats(
            steps=self.steps_observed,
            drift_share=drift.total,
            drift_share_halves=drift_halves,
            drift_share_per_tensor=per_tensor,
            displacement_norm=math.sqrt(drift.now_sq_norm),
            selected_numel=int(counts[0]),
            eligible_numel=int(counts[1]),
            selected_tensors=sum(1 for v in selected_tensors if v > 0),
            r2_values=r2,
            rank1_share=rank1_share,
            rank1_matrices=rank1_matrices,
        )

    def _find_rank1(self, iters: int) -> tuple[float, int]:
        """This cycle's rank-1 parts of every matrix's W − A, and the coefficient `project` adds along each per unit
        of (β − 1): σ (two_point) or m · uᵀ V v (least_squares). Returns (energy share, matrices moved)."""
        self.rank1 = power_iteration(
            lambda: self._matrix_chunks(
                lambda i, s, e: self.masters[i][s:e].double() - self._elements(self.anchors[i], i, slice(s, e)).double()
            ),
            self.matrix_shapes,
            [v.to(self.masters[0].device) for v in self.rank1_start],
            iters,
            self._all_reduce_on_device,
        )
        moved = self.rank1.sigma > 0
        # warm start next cycle from this cycle's v (identical on every rank: it comes out of an all-reduce)
        self.rank1_start = [v.cpu() if ok else s for v, s, ok in zip(self.rank1.v, self.rank1_start, moved.tolist())]
        if self.trend is not None and self.trend.has_fit:
            partial = [0.0] * len(self.matrices)
            for mi, offset, values in self._matrix_chunks(lambda i, s, e: self.trend.comoment[i][s:e]):
                partial[mi] += bilinear(values, offset, self.matrix_shapes[mi], self.rank1.u[mi], self.rank1.v[mi])
            slopes = self._all_reduce(partial) / self.trend.step_sq_dev  # uᵀ V v per matrix
            self.rank1_steps = (slopes * self.steps_observed).tolist()
        else:
            self.rank1_steps = self.rank1.sigma.tolist()
        energy = float(self.rank1.sq_norm.sum())
        share = float((self.rank1.sigma**2).sum()) / energy if energy > 0 else math.nan
        return share, int(moved.sum())

    def _matrix_chunks(self, values):
        """(matrix index, offset in the matrix, values(i, s, e)) for every chunk of this rank's slices of the
        name-selected matrices, at most DEFAULT_CHUNK_NUMEL elements each (the rank-1 passes' memory bound)."""
        index = {n: k for k, n in enumerate(self.matrices)}
        for i, group in enumerate(self.slices):
            for name, s, e, offset in group:
                if name not in index or s >= e:
                    continue
                for cs, ce in chunk_bounds(e - s, DEFAULT_CHUNK_NUMEL):
                    yield index[name], offset + cs, values(i, s + cs, s + ce)

    @torch.no_grad()
    def project(self, beta: float) -> ProjectionStats:
        """W ← A + β (W − A) (or W + (β − 1) m v with the least-squares slope v) on the cycle's selected
        elements of this rank's partitions — rank1: W += (β − 1) c u vᵀ on every matrix slice, c = σ or m uᵀ V v
        (`end_cycle` found them) — then refresh low precision. A collective: same β on every rank."""
        if not self.has_anchor:
            raise RuntimeError("RL-Extra: project() before snapshot()")
        anchors = [self._on_shard(a, i) for i, a in enumerate(self.anchors)]
        sq = sum(displacement_stats(self.masters, anchors, self.masks).per_tensor.tolist())  # ‖W − A‖² of what moves
        if self.strategy == "rank1":
            if self.rank1 is None:
                raise RuntimeError("RL-Extra: rank1 project() before end_cycle()")
            u, v = self.rank1.u, self.rank1.v
            for mi, offset, w in self._matrix_chunks(lambda i, s, e: self.masters[i][s:e]):
                add_outer_(w, offset, self.matrix_shapes[mi], u[mi], v[mi], (beta - 1.0) * self.rank1_steps[mi])
        elif self.trend is not None and self.trend.has_fit:
            self.trend.advance_(self.masters, (beta - 1.0) * self.steps_observed, self.masks)
        else:
            project_(self.masters, anchors, beta, self.masks)
        finite = all(bool(torch.isfinite(m).all()) for m in self.masters)
        sums = self._all_reduce([sq, self._projected_numel(), self._total_numel(), 0.0 if finite else 1.0]).tolist()
        self.refresh_low_precision()
        return ProjectionStats(
            beta=beta,
            projected_numel=int(sums[1]),
            total_numel=int(sums[2]),
            displacement_norm=math.sqrt(sums[0]),
            finite=sums[3] == 0.0,
        )

    @torch.no_grad()
    def restore_anchor(self) -> None:
        """W ← A exactly (lookahead: back to the slow weights, also from non-finite fast weights); refresh low
        precision."""
        snapshot_(self.masters, [self._on_shard(a, i) for i, a in enumerate(self.anchors)])
        self.refresh_low_precision()

    @torch.no_grad()
    def begin_phase(self) -> None:
        """Backup ← the master weights: what every candidate projection of this phase starts from, and what
        `rollback` restores (also after a phase that failed half-way)."""
        if self.backup is None:
            raise RuntimeError("RL-Extra: begin_phase needs keep_backup=True")
        snapshot_(self.backup, self.masters)

    @torch.no_grad()
    def rollback(self) -> None:
        """Restore the master weights of the phase start (`begin_phase`) and refresh low precision."""
        if self.backup is None:
            raise RuntimeError("RL-Extra: rollback needs keep_backup=True")
        snapshot_(self.masters, self.backup)
        self.refresh_low_precision()

    @torch.no_grad()
    def reset_optimizer_state(self) -> int:
        """Adam restarts on the partitions (moments and step count zeroed), as if the optimizer were new.
        Returns how many state tensors were reset."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        count = 0
        for flat in self.masters:
            state = inner.state.get(flat)
            if not state:
                continue
            for key, value in list(state.items()):
                if torch.is_tensor(value):
                    value.zero_()
                    count += 1
                elif key == "step":
                    state[key] = 0
                    count += 1
        return count

    @torch.no_grad()
    def refresh_low_precision(self) -> None:
        opt = self.optimizer
        if self.stage == 3:
            for lp, fp32 in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                if lp.data_ptr() != fp32.data_ptr():
                    lp.data.copy_(fp32.data)
            persistent = opt.persistent_parameters
            if persistent:
                # Small params keep a full replica refreshed only inside the optimizer step; all_gather skips
                # params marked available, so release them first.
                persistent[0].partition(persistent)
                persistent[0].all_gather(persistent)
        else:
            opt.update_lp_params()

    # --------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Everything a resumed job needs to continue the cycle exactly (CPU copies)."""
        state = {
            "anchors": [a.detach().cpu().clone() for a in self.anchors],
            "prev": [p.detach().cpu().clone() for p in self.prev],
            "has_anchor": self.has_anchor,
            "has_prev": self.has_prev,
            "has_half": self.has_half,
            "steps_observed": self.steps_observed,
            "samples": [s.clone() for s in self.samples],
            "rank1_start": [v.clone() for v in self.rank1_start],
        }
        if self.trend is not None:
            t = self.trend.state_dict()
            state["trend"] = {
                k: ([x.detach().cpu().clone() for x in v] if isinstance(v, list) else v) for k, v in t.items()
            }
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for dst, src in zip(self.anchors, state["anchors"]):
            dst.copy_(src)
        for dst, src in zip(self.prev, state["prev"]):
            dst.copy_(src)
        self.has_anchor, self.has_prev = bool(state["has_anchor"]), bool(state["has_prev"])
        self.has_half = bool(state["has_half"])
        self.steps_observed = int(state["steps_observed"])
        self.samples = list(state["samples"])
        self.rank1_start = [v.clone() for v in state["rank1_start"]]
        if self.trend is not None and "trend" in state:
            self.trend.load_state_dict(state["trend"])

    # -------------------------------------------------------------------------------------------- stats

    def _names_with_selected(self) -> set[str]:
        """Parameters with at least one element in this cycle's masks (this rank's slices)."""
        return {
            n
            for group, m in zip(self.slices, self.masks)
            for n, s, e, _ in group
            if s < e and (m is None or bool(m[s:e].any()))
        }

    def _drift_partial_sums(self, halves: bool) -> torch.Tensor:
        """float64[P, 3]: `drift_partial_sums` per parameter (rows in `param_names` order) over this rank's
        name-selected elements; zero rows for the others. halves: of the first cycle's halves (prev holds the first
        half W_h − A: d_prev = W_h − A, d_now = W − W_h), else of d_prev and d_now = W − A."""
        row = {n: i for i, n in enumerate(self.param_names)}
        out = torch.zeros(len(self.param_names), 3, dtype=torch.float64)
        allowed = set(self.selected_names)
        for i, (w, group) in enumerate(zip(self.masters, self.slices)):
            a, p = self._on_shard(self.anchors[i], i), self._on_shard(self.prev[i], i)
            for name, s, e, _ in group:
                if name in allowed and s < e:
                    mid = a[s:e].double() + p[s:e].double() if halves else a[s:e]  # W_h = A + (W_h − A)
                    out[row[name]] += drift_partial_sums(w[s:e], mid, p[s:e]).cpu()
        return out

    def _masks_for_names(self, keep: set) -> list[torch.Tensor | None]:
        masks, allowed = [], keep & set(self.selected_names)
        for flat, group in zip(self.masters, self.slices):
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            for name, s, e, _ in group:
                if name in allowed:
                    mask[s:e] = True
            masks.append(mask)
        return masks

    def _steady_score(self, i: int, where: slice | torch.Tensor) -> torch.Tensor:
        """float32[s]: `steady_displacement` of flat i's elements at `where` (a slice or an int64[s] index tensor on
        the shard's device), 0 outside the name globs."""
        prev = self._elements(self.prev[i], i, where) if self.has_prev else None
        score = steady_displacement(self.masters[i][where], self._elements(self.anchors[i], i, where), prev)
        name_mask = self.name_masks[i]
        return score if name_mask is None else score * name_mask[where]

    def _top_element_masks(self, fraction: float) -> list[torch.Tensor]:
        """bool[numel] per flat: the top `fraction` of all ranks' name-selected elements by steady displacement."""
        return top_fraction_mask(
            self._steady_score,
            self.masters,
            fraction,
            sample_size=TOP_SAMPLE_SIZE,
            generator=torch.Generator().manual_seed(1234 + self._rank()),  # a different sample on every rank
            gather=self._all_gather,
        )

    def _sample_r2(self) -> list[float]:
        if len(self.samples) < 3:
            return []
        y = torch.stack(self.samples, dim=1)  # float64[S, T]
        keep = torch.cat([self._name_mask(i)[ix].cpu() for i, ix in enumerate(self.sample_index)])
        r2 = r2_score(y[keep])
        return [float(v) for v in r2[~torch.isnan(r2)]]

    def _projected_numel(self) -> int:
        return sum(m.numel() if mask is None else int(mask.sum()) for m, mask in zip(self.masters, self.masks))

    def _total_numel(self) -> int:
        return sum(m.numel() for m in self.masters)

    def _on_shard(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """`t` (an anchor or d_prev of flat i, possibly kept on CPU) on the device of master flat i."""
        return t.to(self.masters[i].device)

    def _elements(self, t: torch.Tensor, i: int, where: slice | torch.Tensor) -> torch.Tensor:
        """`t[where]` on the device of master flat i: only the picked elements move, not all of a CPU-kept `t`."""
        if isinstance(where, torch.Tensor):
            where = where.to(t.device)
        return self._on_shard(t[where], i)

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def _all_reduce(self, values: torch.Tensor | list[float]) -> torch.Tensor:
        """float64[...] on CPU: `values` (numbers, or a float64 tensor of any shape) summed over ranks."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.masters[0].device, copy=True)
        if self._distributed():
            torch.distributed.all_reduce(t)
        return t.cpu()

    def _all_reduce_on_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (float64, on the shard's device) summed over ranks, in place."""
        if self._distributed():
            torch.distributed.all_reduce(t)
        return t

    def _all_gather(self, sample: torch.Tensor) -> torch.Tensor:
        """float[R·s] on CPU: every rank's `sample` (float[s], the same s on every rank), rank after rank."""
        if not self._distributed():
            return sample
        local = sample.to(self.masters[0].device)
        gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, local)
        return torch.cat([g.cpu() for g in gathered])


def _is_matrix(shape: tuple[int, ...]) -> bool:
    """A weight matrix for rank1: at least two dimensions, more than one row and more than one column."""
    return len(shape) >= 2 and shape[0] > 1 and math.prod(shape[1:]) > 1
