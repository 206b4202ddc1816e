"""RL-Extra on the learner side: project each rank's shard of DeepSpeed's fp32 master weights in place.

Every rank touches only what it owns (no gather), keeps the optimizer state, and refreshes the low-precision
parameters the next forward pass uses (`shared/notes/deepspeed-zero.md`):

| ZeRO | fp32 master partition (projected)                      | low-precision refresh                          |
|------|---------------------------------------------------------|-----------------------------------------------|
| 1, 2 | `optimizer.single_partition_of_fp32_groups`            | `optimizer.update_lp_params()` (all-gather)   |
| 1+bf16 (BF16_Optimizer) | `optimizer.fp32_groups_flat_partition` | `optimizer.update_lp_params()`                |
| 3    | `optimizer.fp32_partitioned_groups_flat`               | copy into `fp16_partitioned_groups_flat`, then re-gather the persistent (small) params |

Projecting only the low-precision copy would be undone by the next optimizer step, and projecting only the
master would leave the next forward on old weights; so both, in that order.

Which elements move is decided per parameter by name (`linearity.selection.TensorSelector` include / exclude
globs, norm layers excluded by default, the same rules as the offline `orchestrator.extrapolate`): each parameter's slice of the local partition is located from DeepSpeed's
own offsets, and a boolean mask over the partition selects it. The anchor (weights at the cycle start) lives
with the shard, on the same device (or CPU by config), one extra copy of the local partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from linearity.projection import displacement_stats, project_, snapshot_
from linearity.selection import DEFAULT_EXCLUDE, TensorSelector


@dataclass
class ProjectionStats:
    """One rank's view of a projection (sums are all-reduced over ranks before they are returned)."""

    beta: float
    projected_numel: int  # elements moved, all ranks
    total_numel: int  # elements in the partitions, all ranks
    displacement_norm: float  # ||W - A|| over the projected elements before projection, all ranks
    finite: bool  # every projected value finite on every rank


class ShardProjector:
    """Holds a rank's anchor and performs snapshot / project / rollback on its master partitions."""

    def __init__(self, engine, stage: int, include=("*",), exclude=None, anchor_device: str | None = None,
                 keep_backup: bool = True):
        self.engine = engine
        self.optimizer = engine.optimizer
        self.stage = stage
        self.masters = self._master_flats()
        names = {id(p): n for n, p in engine.module.named_parameters()}
        selector = TensorSelector(tuple(include), tuple(DEFAULT_EXCLUDE if exclude is None else exclude))
        self.masks = self._build_masks(names, selector)
        device = anchor_device or self.masters[0].device
        self.anchors = [torch.empty_like(m, device=device) for m in self.masters]
        self.backup = [torch.empty_like(m) for m in self.masters] if keep_backup else None
        self.has_anchor = False

    # --------------------------------------------------------------------------------- where things live

    def _master_flats(self) -> list[torch.Tensor]:
        opt = self.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            flats = getattr(opt, attr, None)
            if flats:
                return [f for f in flats if f.numel() > 0]
        raise RuntimeError(f"RL-Extra: no fp32 master partitions found on {type(opt).__name__}")

    def _param_slices(self, names: dict) -> list[list[tuple[str, int, int]]]:
        """For each master flat: (param name, start, end) of the elements this rank owns."""
        opt = self.optimizer
        out: list[list[tuple[str, int, int]]] = []
        rank = torch.distributed.get_rank()
        if self.stage == 3:
            for group in opt.fp16_groups:
                slices, offset = [], 0
                for p in group:
                    n = p.ds_tensor.numel()
                    valid = max(0, min(n, p.ds_numel - rank * n))  # the last rank's partition is padded
                    slices.append((names[id(p)], offset, offset + valid))
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
                    slices.append((names[id(p)], s - left, e - left))
            out.append(slices)
        return out

    def _build_masks(self, names, selector) -> list[torch.Tensor | None]:
        masks: list[torch.Tensor | None] = []
        slices = self._param_slices(names)
        for flat, group_slices in zip(self.masters, slices):
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            for name, s, e in group_slices:
                if selector.selected(name):
                    mask[s:e] = True
            masks.append(None if bool(mask.all()) else mask)
        self.selected_names = sorted({n for g in slices for n, _, _ in g if selector.selected(n)})
        self.skipped_names = sorted({n for g in slices for n, _, _ in g if not selector.selected(n)})
        return masks

    # ------------------------------------------------------------------------------------------- actions

    @torch.no_grad()  # the master flats are the optimizer's leaf parameters
    def snapshot(self) -> None:
        """Anchor ← current master weights (the start of a cycle)."""
        snapshot_(self.anchors, self.masters)
        self.has_anchor = True

    @torch.no_grad()
    def project(self, beta: float) -> ProjectionStats:
        """W ← A + β (W − A) on the selected elements of this rank's partitions, then refresh low precision.

        A collective: every rank must call it with the same β."""
        if not self.has_anchor:
            raise RuntimeError("RL-Extra: project() before snapshot()")
        if self.backup is not None:
            snapshot_(self.backup, self.masters)
        sq = self._selected_sq_norm()
        project_(self.masters, [a.to(m.device) if a.device != m.device else a for a, m in zip(self.anchors, self.masters)],
                 beta, self.masks)
        finite = all(bool(torch.isfinite(m).all()) for m in self.masters)
        sums = self._all_reduce([sq, float(self._projected_numel()), float(self._total_numel()), 0.0 if finite else 1.0])
        self.refresh_low_precision()
        return ProjectionStats(beta=beta, projected_numel=int(sums[1]), total_numel=int(sums[2]),
                               displacement_norm=math.sqrt(sums[0]), finite=sums[3] == 0.0)

    @torch.no_grad()
    def rollback(self) -> None:
        """Restore the pre-projection master weights (needs keep_backup) and refresh low precision."""
        if self.backup is None:
            raise RuntimeError("RL-Extra: rollback needs keep_backup=True")
        snapshot_(self.masters, self.backup)
        self.refresh_low_precision()

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

    # -------------------------------------------------------------------------------------------- stats

    def _selected_sq_norm(self) -> float:
        total = 0.0
        for w, a, m in zip(self.masters, self.anchors, self.masks):
            a = a.to(w.device)
            if m is None:
                total += float(displacement_stats(w, a)[1])
            else:
                d = (w[m].float() - a[m].float())
                total += float((d.double() ** 2).sum())
        return total

    def _projected_numel(self) -> int:
        return sum(m.numel() if mask is None else int(mask.sum()) for m, mask in zip(self.masters, self.masks))

    def _total_numel(self) -> int:
        return sum(m.numel() for m in self.masters)

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.masters[0].device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()
