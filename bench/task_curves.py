"""GRPO learning curves of an embedded task: eval Avg@4 against RL steps for a grid of learning rates and seeds,
the warm start's accuracy per seed, and the linearity monitor's readings along each run.

Every run is plain GRPO as far as the weights go: `schedule=rl_extra` with `beta_mode=schedule` and `n=0` makes
each cycle's projection β = 1 (nothing moves) while the monitor still records, every `m` = 10 real steps, the drift
share (cosine between consecutive 10-step displacements) and the median R² of the sampled weights. The eval runs
every `--eval-every` steps on the task's held-out split (500 prompts, 4 samples each at temperature 1).

Reported: per lr the seed-mean curve, best and final accuracy, the step the seed-mean curve first reaches 90 % of
its own rise (how gradual it is) and the monitor's median readings; GRPO's best lr (highest seed-mean final
accuracy) and whether it is interior to the grid (a larger lr does worse); the warm-start accuracy per seed
(step 0 of each run, plus `--warm-seeds` evaluated without training). `--plot` draws the curves per lr (seed mean
and range).

    python bench/task_curves.py [--data toy_skills] [--lrs 5e-5,1e-4,2e-4,4e-4,8e-4] [--seeds 0,1] [--steps 200]
                                [--warm-seeds 0-9] [--set data.toy.careful_shares=[...] ...] [--reuse] [--report-only]

`--set` measures a variant of the task (config overrides; its runs are named with a digest of them, so variants never
mix in the store); `--reuse` trains only the runs the store does not hold yet (matched by that name: the code that
made a reused run is not checked, so use it within one session of experiments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

import common  # noqa: F401
from common import RESULTS, ROOT, code_version, emit, run_overrides, start_ray

EXPERIMENT = "bench-task-curves"
MONITOR = ["schedule=rl_extra", "schedule.beta_mode=schedule", "schedule.m=10", "schedule.n=0"]


def run_one(data: str, overrides: list[str], lr: str, seed: int, steps: int, eval_every: int, out_dir: str, db) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.config import compose
    from orchestrator.train import run_job

    name = run_name(data, overrides, lr, seed, steps)
    cfg = compose(
        [
            f"data={data}",
            *overrides,
            f"seed={seed}",
            f"learner.lr={lr}",
            f"trainer.total_steps={steps}",
            f"trainer.eval_every={eval_every}",
            *run_overrides(name, out_dir, f"sqlite:///{db}", ROOT / ".cache" / "rlextra", EXPERIMENT),
            *(MONITOR if steps else ["schedule=rl"]),
        ]
    )
    summary = run_job(cfg, f"{out_dir}/{name}")
    return collect(MlflowClient(tracking_uri=f"sqlite:///{db}"), summary["mlflow_run_id"])


def run_name(data: str, overrides: list[str], lr: str, seed: int, steps: int) -> str:
    """A run's name in the store; a variant (`--set`) adds a digest of its overrides, so variants never mix."""
    variant = "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8] if overrides else ""
    return f"{data}{variant}-lr{lr}-seed{seed}-steps{steps}"


def collect(client, run_id: str) -> dict:
    """One run's eval curve and monitor readings, read back from MLflow (metrics and summary.json)."""
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/avg_at_k"))
    step_s = [m.value for m in client.get_metric_history(run_id, "time/step_s")]
    with tempfile.TemporaryDirectory() as tmp:
        summary = json.loads(open(client.download_artifacts(run_id, "summary.json", tmp)).read())
    records = summary.get("extrapolations", [])
    return {
        "curve": curve,
        "mean_step_s": sum(step_s) / len(step_s) if step_s else None,
        "monitor": [(r["rl_step"], r["drift_share"], r["r2_median"]) for r in records],
    }


def from_db(db, names: list[str]) -> dict:
    """--report-only: the newest finished run of each name already in the benchmark's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = {}
    for name in names:
        runs = client.search_runs(
            [exp.experiment_id] if exp else [],
            filter_string=f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            found[name] = collect(client, runs[0].info.run_id)
    return found


def finite(xs) -> list[float]:
    return [x for x in xs if x is not None and x == x]


def summarise(runs: list[dict]) -> dict:
    """Seed-mean curve of one lr and what it says."""
    steps = [s for s, _ in runs[0]["curve"]]
    mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
    start, top = mean[0], max(mean)
    rise_90 = next(s for s, v in zip(steps, mean) if v >= start + 0.9 * (top - start)) if top > start else None
    readings = [m for r in runs for m in r["monitor"]]
    drift, r2 = finite(d for _, d, _ in readings), finite(x for _, _, x in readings)
    return {
        "curve": [[s, round(v, 3)] for s, v in zip(steps, mean)],
        "start": round(start, 3),
        "best": round(top, 3),
        "final": round(mean[-1], 3),
        "final_per_seed": [round(r["curve"][-1][1], 3) for r in runs],
        "step_to_90pct_of_rise": rise_90,
        "drift_share_median": round(statistics.median(drift), 3) if drift else None,
        "r2_median": round(statistics.median(r2), 3) if r2 else None,
        "monitor_by_step": [
            [
                step,
                round(statistics.fmean(finite([d for s, d, _ in readings if s == step]) or [float("nan")]), 3),
                round(statistics.fmean([x for s, _, x in readings if s == step]), 3),
            ]
            for step in sorted({s for s, _, _ in readings})
        ],
        "mean_step_s": round(statistics.fmean(finite(r["mean_step_s"] for r in runs)), 3),
    }


def plot(path, data: str, per_lr: dict, runs_by_lr: dict, best_lr: str) -> None:
    """GRPO's eval curve per lr: the seed mean (line) and the range over seeds (band); the best lr drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for lr, row in per_lr.items():
        steps = [s for s, _ in row["curve"]]
        columns = list(zip(*([v for _, v in r["curve"]] for r in runs_by_lr[lr])))  # per eval step, one value a seed
        (line,) = ax.plot(
            steps,
            [v for _, v in row["curve"]],
            lw=2.5 if lr == best_lr else 1.2,
            label=f"lr {lr}: final {row['final']}, 90 % of its rise at step {row['step_to_90pct_of_rise']}",
        )
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.12)
    ax.set_xlabel("GRPO steps")
    ax.set_ylabel("eval Avg@4 (500 held-out prompts)")
    ax.set_title(f"{data}: GRPO per learning rate, mean and range over {len(runs_by_lr[best_lr])} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_list(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="toy_skills", help="the data group (task) to measure")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides of a task variant (data.toy.num_train=5000)")
    ap.add_argument("--lrs", default="5e-5,1e-4,2e-4,4e-4,8e-4", help="GRPO learning rates")
    ap.add_argument("--seeds", default="0,1", help="seeds of the lr grid (each its own warm start)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--warm-seeds", default="", help="more seeds whose warm start is only evaluated, e.g. 2-9")
    ap.add_argument("--report-only", action="store_true", help="report the runs already in the store")
    ap.add_argument("--reuse", action="store_true", help="train only the runs the store does not hold yet")
    ap.add_argument("--plot", type=Path, help="where to draw the curves (default docs/img/task_curves_<data>.png)")
    args = ap.parse_args()
    lrs, seeds, warm_seeds = args.lrs.split(","), seed_list(args.seeds), seed_list(args.warm_seeds)
    grid = {(lr, s): run_name(args.data, args.set, lr, s, args.steps) for lr in lrs for s in seeds}
    warm_only = {s: run_name(args.data, args.set, lrs[0], s, 0) for s in warm_seeds if s not in seeds}
    db = RESULTS / "task_curves.db"
    RESULTS.mkdir(parents=True, exist_ok=True)
    # every run this report needs: name -> (lr, seed, steps); warm-only runs evaluate the warm start and stop
    jobs = {name: (lr, s, args.steps) for (lr, s), name in grid.items()}
    jobs.update({name: (lrs[0], s, 0) for s, name in warm_only.items()})
    found = from_db(db, list(jobs)) if args.report_only or args.reuse else {}
    if not args.report_only:
        ray = start_ray()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for name, (lr, s, steps) in jobs.items():
                    if name not in found:
                        found[name] = run_one(args.data, args.set, lr, s, steps, args.eval_every, tmp, db)
                        print(f"{name}: {[round(v, 3) for _, v in found[name]['curve']]}", flush=True)
        finally:
            ray.shutdown()
    missing = [n for n in jobs if n not in found]
    if missing:
        raise SystemExit(f"no finished run in {db} for {missing}; run without --report-only")

    runs_by_lr = {lr: [found[grid[lr, s]] for s in seeds] for lr in lrs}
    per_lr = {lr: summarise(runs) for lr, runs in runs_by_lr.items()}
    warm = {s: round(found[grid[lrs[0], s]]["curve"][0][1], 3) for s in seeds}
    warm.update({s: round(found[name]["curve"][0][1], 3) for s, name in warm_only.items()})
    print(f"{'lr':>8} {'start':>6} {'best':>6} {'final':>6} {'90% rise':>9} {'drift':>6} {'R2':>6}  curve (seed mean)")
    for lr, row in per_lr.items():
        print(
            f"{lr:>8} {row['start']:>6.3f} {row['best']:>6.3f} {row['final']:>6.3f} "
            f"{str(row['step_to_90pct_of_rise']):>9} {str(row['drift_share_median']):>6} {str(row['r2_median']):>6}  "
            f"{[v for _, v in row['curve']]}"
        )
    print(f"warm-start Avg@4 per seed: {warm}")
    best_lr = max(lrs, key=lambda lr: per_lr[lr]["final"])
    interior = lrs.index(best_lr) not in (0, len(lrs) - 1)
    args.plot = args.plot or ROOT / "docs" / "img" / f"task_curves_{args.data}.png"
    plot(args.plot, args.data, per_lr, runs_by_lr, best_lr)
    print(f"curves: {args.plot}")
    emit(
        {
            "metric": f"steps for GRPO at its best lr to reach 90% of its rise on {args.data}",
            "value": per_lr[best_lr]["step_to_90pct_of_rise"],
            "goal": ">= 150 steps, best lr interior to the grid, every seed's warm start usable",
            "overrides": args.set,
            "code": code_version(),  # at report time (--reuse and --report-only do not check the stored runs' code)
            "best_lr": best_lr,
            "best_lr_interior": interior,
            "final_by_lr": {lr: per_lr[lr]["final"] for lr in lrs},
            "best_by_lr": {lr: per_lr[lr]["best"] for lr in lrs},
            "warm_start_by_seed": warm,
            "warm_start_spread": round(max(warm.values()) - min(warm.values()), 3),
            "per_lr": per_lr,
        }
    )


if __name__ == "__main__":
    main()
