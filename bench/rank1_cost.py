"""What the rank-1 strategy costs per cycle, side by side with the chord projection, on 2 real ZeRO ranks.

Per cycle the rank-1 strategy (linearity/rank1.py, run by linearity/zero_shards.py) adds a power iteration to the
phase: `iters` × (two passes over the rank's shard forming W − A chunk by chunk, and two all-reduces of Σ (R + C)
doubles), then a pass adding (β − 1) σ u vᵀ to every matrix slice. The chord projection of `extrapolate` is one
lerp pass. Both are timed here on the same learner group after the same training steps, warm, as medians:

- `end_cycle`: the monitor (drift share, R² sample) plus, for rank1, the power iteration;
- `project`: the move itself (then rolled back, so every repeat starts from the same weights);
- a training step of the same group, for scale.

Memory: the peak resident set of each rank's process while the call runs (sampled every 2 ms from this process)
over its resident set just before; the rank-1 state itself is Σ (R + C) doubles per vector (u, v, the warm start).

    python bench/rank1_cost.py [--shapes tiny 100m] [--stage 3] [--iters 8] [--repeats 5]

Prints human lines and ends with one JSON line: the rank-1 phase time on the largest shape as a share of a cycle
of m = 10 training steps (goal ≤ 2 %).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common
from common import build_model_dir, emit, start_ray

from tests.helpers import behaviour_logp, random_batch, stop_learner_group


class PeakRSS:
    """Samples the resident set of some processes in a thread; `peak_delta()` = max over them of peak − start."""

    def __init__(self, pids: list[int]):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.start = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.start)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for i, p in enumerate(self.procs):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def peak_delta(self) -> int:
        return max(p - s for p, s in zip(self.peak, self.start))


def timed(ray, actors, pids, method: str, *args) -> tuple[float, int]:
    with PeakRSS(pids) as rss:
        t = time.perf_counter()
        ray.get([getattr(a, method).remote(*args) for a in actors])
        elapsed = time.perf_counter() - t
    return elapsed, rss.peak_delta()


def start_ranks(ray, spec) -> tuple[list, list[int]]:
    """The learner ranks on this node (one CPU each), set up; and their process ids."""
    from actors.learner import LearnerActor
    from orchestrator.cluster import free_port, learner_actor_env

    port = free_port()
    remote = ray.remote(LearnerActor).options(num_cpus=1, runtime_env={"env_vars": learner_actor_env(1)})
    actors = [remote.remote(spec, rank, "127.0.0.1", port) for rank in range(spec.learner.world_size)]
    return actors, [info["pid"] for info in ray.get([a.setup.remote() for a in actors])]


def measure(ray, shape: str, stage: int, iters: int, repeats: int, workdir: Path) -> dict:
    from actors.learner import LearnerSpec
    from orchestrator.batches import shard_batch
    from orchestrator.config import AlgoConfig, LearnerConfig

    path, n_params = build_model_dir(shape, workdir)
    spec = LearnerSpec(
        path,
        LearnerConfig(world_size=2, zero_stage=stage, dtype="fp32", lr=1e-4, micro_batch_size=8, num_threads=1),
        AlgoConfig(loss_agg="seq-mean-token-mean"),
        samples_per_rank=8,
        seed=0,
    )
    batch = random_batch(path)
    batch.old_logp = behaviour_logp(path, batch)
    shards = shard_batch(batch, 2)
    actors, pids = start_ranks(ray, spec)
    out = {"params": n_params}
    try:
        steps = []
        for _ in range(3):
            t = time.perf_counter()
            ray.get([a.train_step.remote(s) for a, s in zip(actors, shards)])
            steps.append(time.perf_counter() - t)
        out["train_step_s"] = statistics.median(steps)
        for strategy in ("extrapolate", "rank1"):
            ray.get([a.extra_setup.remote(("*",), None, None, "two_point", 2048, strategy, 0) for a in actors])
            ray.get([a.extra_snapshot.remote() for a in actors])
            for _ in range(2):
                ray.get([a.train_step.remote(s) for a, s in zip(actors, shards)])
            ray.get([a.extra_begin_phase.remote() for a in actors])
            rows = []
            for _ in range(repeats + 1):  # the first is the warm-up
                end, end_mem = timed(ray, actors, pids, "extra_end_cycle", "names", 0.7, 0.1, iters)
                proj, proj_mem = timed(ray, actors, pids, "extra_project", 2.0)
                ray.get([a.extra_rollback.remote() for a in actors])
                rows.append((end, proj, end_mem, proj_mem))
            rows = rows[1:]
            stats = ray.get(actors[0].extra_end_cycle.remote("names", 0.7, 0.1, iters))
            out[strategy] = {
                "end_cycle_s": statistics.median(r[0] for r in rows),
                "project_s": statistics.median(r[1] for r in rows),
                "end_cycle_peak_rss_mb": max(r[2] for r in rows) / 2**20,
                "project_peak_rss_mb": max(r[3] for r in rows) / 2**20,
            }
            if strategy == "rank1":
                out[strategy]["matrices"] = stats.rank1_matrices
                out[strategy]["energy_share"] = stats.rank1_share
        return out
    finally:
        stop_learner_group(ray, actors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "100m"], choices=sorted(common.SHAPES))
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray = start_ray()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            r = measure(ray, shape, args.stage, args.iters, args.repeats, Path(tmp))
            results[shape] = r
            for strategy in ("extrapolate", "rank1"):
                s = r[strategy]
                print(
                    f"{shape} ({r['params'] / 1e6:.1f}M params, ZeRO-{args.stage}, 2 ranks) {strategy:>11}: "
                    f"end_cycle {s['end_cycle_s'] * 1e3:.0f} ms (+{s['end_cycle_peak_rss_mb']:.0f} MiB peak), "
                    f"project {s['project_s'] * 1e3:.0f} ms (+{s['project_peak_rss_mb']:.0f} MiB peak); "
                    f"train step {r['train_step_s'] * 1e3:.0f} ms"
                )
    big = results[args.shapes[-1]]
    rank1 = big["rank1"]["end_cycle_s"] + big["rank1"]["project_s"]
    chord = big["extrapolate"]["end_cycle_s"] + big["extrapolate"]["project_s"]
    emit(
        {
            "metric": "rank1_phase_share_of_a_10_step_cycle",
            "value": rank1 / (10 * big["train_step_s"]),
            "goal": 0.02,
            "shape": args.shapes[-1],
            "rank1_phase_s": rank1,
            "chord_phase_s": chord,
            "rank1_over_chord": rank1 / chord,
            "iters": args.iters,
            "zero_stage": args.stage,
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
