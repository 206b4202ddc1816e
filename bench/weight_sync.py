"""Weight sync: learner (DeepSpeed) → rollout (vLLM) time vs an in-memory copy of the same weights.

The sync is the job's real path (`ActorGroups.sync_weights`): every learner rank gathers full weights,
rank 0 returns layer-aligned buckets to the object store, each rollout actor loads them through the vLLM
worker extension and resets its prefix cache. The baseline is `copy_` of the same tensors into
preallocated buffers in one process: the least any sync must pay. Headline: sync ÷ copy (goal ≤ 3), for
the tiny model and a ~100M-parameter Qwen2 built in code.

    python bench/weight_sync.py [--shapes tiny,100m] [--repeats 5] [--world-size 1] [--zero-stage 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, build_model_dir, emit, start_ray


def copy_baseline_s(model_path: str, repeats: int) -> float:
    import torch
    from safetensors.torch import load_file

    src = load_file(str(Path(model_path) / "model.safetensors"))
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in src.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync_s(ray, model_path: str, repeats: int, world_size: int, zero_stage: int, bucket_mb: float):
    from actors.learner import LearnerSpec
    from actors.rollout import RolloutSpec
    from orchestrator.cluster import start_actor_groups
    from orchestrator.config import AlgoConfig, JobConfig, LearnerConfig, RolloutConfig

    learner = LearnerConfig(world_size=world_size, zero_stage=zero_stage, micro_batch_size=1, num_threads=1)
    rollout = RolloutConfig(max_model_len=64, kv_cache_mb=32)
    cfg = JobConfig(learner=learner, rollout=rollout)
    spec = LearnerSpec(model_path, learner, AlgoConfig(), samples_per_rank=1, seed=0)
    groups = start_actor_groups(cfg, spec, [RolloutSpec(model_path, rollout, seed=0)])
    try:
        groups.sync_weights(bucket_mb)  # warm-up
        times, loads = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            info = groups.sync_weights(bucket_mb)
            times.append(time.perf_counter() - start)
            loads.append(info["load_s"])
        return statistics.median(times), statistics.median(loads), info["tensors"]
    finally:
        groups.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,100m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=64)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ray = start_ray()
        try:
            for shape in args.shapes.split(","):
                path, n_params = build_model_dir(shape, Path(tmp))
                base = copy_baseline_s(path, args.repeats)
                total, load, tensors = sync_s(ray, path, args.repeats, args.world_size, args.zero_stage, args.bucket_mb)
                rows.append(
                    {
                        "shape": shape,
                        "params": n_params,
                        "sync_s": total,
                        "vllm_load_s": load,
                        "copy_s": base,
                        "ratio": total / base,
                        "tensors": tensors,
                    }
                )
                print(
                    f"{shape:>5}: {n_params / 1e6:7.1f}M params  sync {total * 1e3:8.1f} ms "
                    f"(vLLM load {load * 1e3:.1f} ms)  in-memory copy {base * 1e3:7.2f} ms  ratio {total / base:6.1f}x"
                )
        finally:
            ray.shutdown()
    _plot(rows)
    head = rows[-1]
    emit(
        {
            "metric": "weight_sync_time_over_memcopy",
            "value": round(head["ratio"], 2),
            "goal": 3,
            "headline_shape": head["shape"],
            "world_size": args.world_size,
            "zero_stage": args.zero_stage,
            "rows": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "plot": str(RESULTS / "weight_sync.png"),
        }
    )


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"{r['shape']}\n({r['params'] / 1e6:.1f}M)" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["sync_s"] * 1e3 for r in rows], 0.4, label="learner → vLLM sync")
    ax.bar([i + 0.2 for i in x], [r["copy_s"] * 1e3 for r in rows], 0.4, label="in-memory copy")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend()
    ax.set_title("Weight sync vs copy")
    fig.tight_layout()
    fig.savefig(RESULTS / "weight_sync.png", dpi=120)


if __name__ == "__main__":
    main()
