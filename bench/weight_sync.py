"""Weight sync: learner (DeepSpeed) → rollout (vLLM) time vs an in-memory copy of the same weights.

The sync is the job's real path (`ActorGroups.sync_weights`) on real actors: every learner rank gathers full weights,
rank 0 sends layer-aligned buckets to every engine, through Ray's object store or over the collective weight group
(gloo here), and each engine loads them through its worker extension and resets its prefix cache. For each learner
layout (world size × ZeRO stage) one set of actors is started and both transports are timed on it, side by side and
interleaved sync by sync, plus main's old path (object store + vLLM's layer-wise reload) once as the "before". Each
row is the median of `--repeats` syncs after a warm-up round (odd: the median sync's own split is reported), split into
export (gather + pack on rank 0), load (into vLLM, slowest engine) and transport (the rest: the wire, Ray, waiting;
with the collective's double buffering the stages overlap, so its transport can read 0).

The baseline is `copy_` of the same tensors into preallocated buffers in one process, timed once per round in the
driver (interleaved like the rest): the least any sync must pay.
Headline: sync ÷ copy of the configured default transport at world size 1, ZeRO-2 (the default job's learner), on
the `--shape` model (default `100m`: a 96M-parameter tied Qwen2 built in code, see bench/common.py).

    python bench/weight_sync.py [--shape 100m] [--layouts 1x2,1x3,2x2,2x3] [--repeats 5] [--engines 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, build_model_dir, emit, start_ray

MODES = ("object_store", "collective")


class CopyBaseline:
    """`copy_` of the model's tensors into preallocated buffers in this process: the least any sync must pay."""

    def __init__(self, model_path: str):
        import torch
        from safetensors.torch import load_file

        self.src = {k: v.clone() for k, v in load_file(str(Path(model_path) / "model.safetensors")).items()}
        self.dst = {k: torch.empty_like(v) for k, v in self.src.items()}
        self.times: list[float] = []
        self.once()  # touches the destination pages

    def once(self) -> float:
        start = time.perf_counter()
        for k, v in self.src.items():
            self.dst[k].copy_(v)
        self.times.append(time.perf_counter() - start)
        return self.times[-1]


def set_direct_load(ray, groups, direct: bool) -> None:
    """Direct loading into vLLM's parameters (True) or vLLM's layer-wise reload for every bucket (main's path)."""
    ray.get(
        [
            r.__ray_call__.remote(lambda self: self.llm.collective_rpc("rlextra_set_direct", args=(direct,)))
            for r in groups.rollouts
        ]
    )


def measure_layout(path: str, world_size: int, zero_stage: int, args, with_before: bool, copy) -> list[dict]:
    """Start one learner group and `args.engines` engines; time each variant (transport, load path) on them,
    interleaved sync by sync so that a change in the machine's load hits every variant alike."""
    import ray

    from actors.learner import LearnerSpec
    from actors.rollout import RolloutSpec
    from orchestrator.cluster import start_actor_groups
    from orchestrator.config import AlgoConfig, JobConfig, LearnerConfig, RolloutConfig

    learner = LearnerConfig(world_size=world_size, zero_stage=zero_stage, micro_batch_size=1, num_threads=1)
    rollout = RolloutConfig(
        max_model_len=64, kv_cache_mb=32, num_actors=args.engines, weight_sync="collective", bucket_mb=args.bucket_mb
    )
    cfg = JobConfig(learner=learner, rollout=rollout)
    spec = LearnerSpec(path, learner, AlgoConfig(), samples_per_rank=1, seed=0)
    groups = start_actor_groups(cfg, spec, [RolloutSpec(path, rollout, seed=i) for i in range(args.engines)])
    variants = [(mode, "direct") for mode in MODES] + ([("object_store", "reload (main)")] if with_before else [])
    runs: dict[tuple, list] = {v: [] for v in variants}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms every variant up
            copy.once()
            for mode, load in variants:
                groups.weight_sync = mode
                set_direct_load(ray, groups, load == "direct")
                info = groups.sync_weights(args.bucket_mb)
                if repeat:
                    runs[mode, load].append(info)
    finally:
        groups.shutdown()
    rows = []
    for (mode, load), infos in runs.items():
        median = sorted(infos, key=lambda r: r["total_s"])[len(infos) // 2]  # its split adds up to its total
        parts = {k: median[k] for k in ("total_s", "export_s", "transport_s", "load_s", "tensors")}
        rows.append({"world_size": world_size, "zero_stage": zero_stage, "mode": mode, "load": load} | parts)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="100m", help="model shape of bench/common.py (tiny | 100m)")
    ap.add_argument("--layouts", default="1x2,1x3,2x2,2x3", help="learner world size x ZeRO stage, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", type=int, default=1, help="rollout engines (each receives every sync)")
    ap.add_argument("--bucket-mb", type=float, default=64)
    args = ap.parse_args()
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]

    from orchestrator.config import RolloutConfig

    default_mode = RolloutConfig().weight_sync
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, n_params = build_model_dir(args.shape, Path(tmp))
        copy = CopyBaseline(path)
        print(f"{args.shape}: {n_params / 1e6:.1f}M parameters")
        ray = start_ray()
        try:
            for i, (world_size, zero_stage) in enumerate(layouts):
                layout_rows = measure_layout(path, world_size, zero_stage, args, with_before=i == 0, copy=copy)
                copy_s = statistics.median(copy.times[-args.repeats :])  # the copies of this layout's rounds
                print(f"world {world_size} ZeRO-{zero_stage}: in-memory copy {copy_s * 1e3:.1f} ms")
                for row in layout_rows:
                    row["copy_s"] = copy_s
                    row["ratio"] = row["total_s"] / copy_s
                    rows.append(row)
                    print(
                        f"world {world_size} ZeRO-{zero_stage} {row['mode']:>12} + {row['load']:<13} "
                        f"sync {row['total_s'] * 1e3:7.1f} ms = export {row['export_s'] * 1e3:6.1f} + transport "
                        f"{row['transport_s'] * 1e3:6.1f} + load {row['load_s'] * 1e3:6.1f}   {row['ratio']:5.1f}x copy"
                    )
        finally:
            ray.shutdown()
    _plot(rows, args.shape)
    head = next(
        (r for r in rows if (r["world_size"], r["zero_stage"], r["mode"], r["load"]) == (1, 2, default_mode, "direct")),
        rows[0],
    )
    emit(
        {
            "metric": "sync_over_copy",
            "value": round(head["ratio"], 2),
            "goal": 3,
            "shape": args.shape,
            "params": n_params,
            "headline": {k: head[k] for k in ("world_size", "zero_stage", "mode", "load")},
            "copy_s": round(head["copy_s"], 5),
            "engines": args.engines,
            "repeats": args.repeats,
            "bucket_mb": args.bucket_mb,
            "rows": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "plot": str(RESULTS / "weight_sync.png"),
        }
    )


def _plot(rows, shape: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.8))
    labels = [f"w{r['world_size']} Z{r['zero_stage']}\n{r['mode']}\n{r['load']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("export_s", "transport_s", "load_s"):
        heights = [r[part] * 1e3 for r in rows]
        ax.bar(range(len(rows)), heights, 0.6, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.plot(range(len(rows)), [r["copy_s"] * 1e3 for r in rows], "k_", ms=20, label="in-memory copy")
    ax.plot(range(len(rows)), [3 * r["copy_s"] * 1e3 for r in rows], "r_", ms=20, label="goal: 3x copy")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("ms per sync (median)")
    ax.legend(fontsize=7)
    ax.set_title(f"Weight sync learner → vLLM ({shape})")
    fig.tight_layout()
    fig.savefig(RESULTS / "weight_sync.png", dpi=120)


if __name__ == "__main__":
    main()
