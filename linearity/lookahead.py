"""Slow/fast lookahead after SFPO (Slow-Fast Policy Optimization, arXiv 2510.04072; code: github.com/Urheen/SFPO).

What SFPO's code does per RL step (`sfpo_update_actor` in its verl fork, `fsdp_workers.py`), on one rollout batch:

1. slow weights S ← a copy of the current weights;
2. fast trajectory: K full policy updates (`update_policy`, every PPO mini-batch once) on the *same* batch,
   the optimizer state carried along, the behaviour log-probs of the batch fixed;
3. reposition: W ← S + α (W_fast − S)  (α = 0.8, 0.9 for Qwen3-4B: an interpolation back toward S, which bounds
   the fast steps' off-policy drift);
4. slow correction: one more `update_policy` on the same batch from the repositioned weights;
   the learning-rate scheduler steps once per RL step.

and, in its trainer (`ray_trainer.py`), the switch-off: with the actor's entropy recorded after every step, once
the window holds `zscore_w` (30) values, z = (e_last − mean(window)) / (std(window) + 1e-9) over the last 30 (the
latest included, population std); z ≥ `zscore_threshold` (1.0) stops SFPO for good (plain updates from then on).

Here the reposition is ``linearity.projection.project_(W, S, α)`` on each rank's fp32 master shard, in place (the
anchor is S; no clone of the fast weights: the lerp reads W and S once); the fast and slow steps are the job's own
optimizer steps; `EntropySwitch` is the switch-off. Where rlextra deviates (actors/extrapolator.py says why):
one optimizer step per fast step (SFPO's `update_policy` runs ppo_mini_batch_size mini-batches: 4 steps at its
256/64), and α and the choice to keep the reposition go through the extrapolator's validation and guards.
"""

from __future__ import annotations

import math
from collections import deque


class EntropySwitch:
    """SFPO's entropy-spike switch-off: `observe(entropy)` after every step; `on` turns False for good when the
    z-score of the latest entropy within the last `window` values reaches `threshold` (None: never)."""

    def __init__(self, window: int, threshold: float | None):
        if window < 2:
            raise ValueError(f"window: expected >= 2, got {window}")
        self.window = window
        self.threshold = threshold
        self.history: deque[float] = deque(maxlen=window)
        self.on = True
        self.last_z = math.nan

    def observe(self, entropy: float) -> bool:
        """Record one step's entropy; returns whether lookahead stays on for the next step."""
        self.history.append(float(entropy))
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((e - mean) ** 2 for e in self.history) / self.window)
            self.last_z = (self.history[-1] - mean) / (std + 1e-9)
            if self.threshold is not None and self.last_z >= self.threshold:
                self.on = False
        return self.on

    def state(self) -> dict:
        return {"history": list(self.history), "on": self.on, "last_z": self.last_z}

    def load_state(self, state: dict) -> None:
        self.history = deque((float(e) for e in state["history"]), maxlen=self.window)
        self.on = bool(state["on"])
        self.last_z = float(state["last_z"])
