"""RL-Extra vs GRPO on the embedded toy task: eval accuracy against *real* RL steps and wall time, one run.

Every configuration starts from the same warm start; each runs with every seed (default 3). GRPO gets a
learning-rate sweep so the comparison is against GRPO at its own best lr. Eval (Avg@4 on held-out prompts)
runs every `--eval-every` real steps, aligned with the cycles, so accuracy is also seen right after each
projection; with `schedule.eval_around_projection` every projection is additionally evaluated just before
and just after. Reported per configuration (means over seeds): real steps to reach `--target` accuracy, the
ratio to the best GRPO, final accuracy, wall-time ratio, cycle overhead (extrapolation phase time — monitor,
candidates, validation, sync — as a fraction of a mean RL step), the monitor's drift share and median R²,
and the projections made / skipped / rolled back with the accuracy before → after each one.

    python bench/rl_extra_vs_grpo.py [--steps 80] [--seeds 0,1,2] [--target 0.7] [--configs a,b,...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import common  # noqa: F401
from common import RESULTS, ROOT, emit, start_ray


def compose(overrides):
    from orchestrator.config import compose as compose_job

    return compose_job(overrides)


def run_one(name, overrides, seed, steps, eval_every, out_dir, db):
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    cfg = compose(
        [
            f"seed={seed}",
            f"trainer.total_steps={steps}",
            f"trainer.eval_every={eval_every}",
            "trainer.eval_prompts=200",
            "trainer.progress=false",
            "trainer.save_final=false",
            f"trainer.output_dir={out_dir}/{name}-{seed}",
            f"tracking.tracking_uri=sqlite:///{db}",
            "tracking.experiment=bench-rl-extra-vs-grpo",
            f"tracking.run_name={name}-seed{seed}",
            f"model.cache_dir={ROOT / '.cache' / 'rlextra'}",
            *overrides,
        ]
    )
    summary = run_job(cfg, f"{out_dir}/{name}-{seed}")
    return collect(MlflowClient(tracking_uri=f"sqlite:///{db}"), summary["mlflow_run_id"])


def collect(client, run_id: str) -> dict:
    """One run's curve, timings and projections, read back from MLflow (its metrics and summary.json)."""
    import json
    import tempfile

    acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/avg_at_k"))
    step_t = [m.value for m in client.get_metric_history(run_id, "time/step_s")]
    with tempfile.TemporaryDirectory() as tmp:
        summary = json.loads(open(client.download_artifacts(run_id, "summary.json", tmp)).read())
    records = summary.get("extrapolations", [])
    extra_t = [r["time_s"] for r in records]
    return {
        "curve": acc,
        "wall_s": summary["wall_time_s"],
        "final": acc[-1][1],
        "mean_step_s": sum(step_t) / len(step_t),
        "mean_projection_s": (sum(extra_t) / len(extra_t)) if extra_t else None,
        "virtual_steps": summary["virtual_steps"],
        "projections": [
            {
                "rl_step": r["rl_step"],
                "outcome": r["outcome"],
                "beta": r["beta"],
                "drift_share": r["drift_share"],
                "r2_median": r["r2_median"],
                "selected_frac": r["selected_frac"],
                "acc_before": (r["eval_before"] or {}).get("eval/avg_at_k"),
                "acc_after": (r["eval_after"] or {}).get("eval/avg_at_k"),
            }
            for r in records
        ],
        "counts": {
            k: summary.get(k, 0) for k in ("projections_made", "projections_skipped", "projections_rolled_back")
        },
    }


def from_db(db, configs, seeds) -> dict:
    """--report-only: the newest finished run of every configuration × seed already in the benchmark's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("bench-rl-extra-vs-grpo")
    results = {}
    for name in configs:
        runs = []
        for seed in seeds:
            found = client.search_runs(
                [exp.experiment_id],
                filter_string=f"attributes.run_name = '{name}-seed{seed}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                runs.append(collect(client, found[0].info.run_id))
        if len(runs) == len(seeds):
            results[name] = runs
    return results


def steps_to(curve, target):
    for step, value in curve:
        if value >= target:
            return step
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="", help="comma-separated subset of the configuration names")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="no training: report from the runs already in bench/results/rl_extra_vs_grpo.db",
    )
    args = ap.parse_args()

    rx = ["schedule=rl_extra", "schedule.eval_around_projection=true"]
    configs = {
        "grpo-lr6e-5": ["schedule=rl", "learner.lr=6e-5"],
        "grpo-lr1e-4": ["schedule=rl", "learner.lr=1e-4"],
        "grpo-lr2e-4": ["schedule=rl", "learner.lr=2e-4"],
        # the paper's RL-Extra: all (non-norm) weights, β = (m + n) / m every cycle
        "rx-m10n10-schedule-all-lr1e-4": [
            "learner.lr=1e-4",
            *rx,
            "schedule.m=10",
            "schedule.n=10",
            "schedule.beta_mode=schedule",
            "schedule.selection=names",
        ],
        # selection by measured linearity: the top 5 % of elements by steady displacement, β = 4
        "rx-m10n30-schedule-top5-lr1e-4": [
            "learner.lr=1e-4",
            *rx,
            "schedule.m=10",
            "schedule.n=30",
            "schedule.beta_mode=schedule",
            "schedule.selection_fraction=0.05",
        ],
        # the default: auto (monitor gate + validation line search over β ∈ {2, 4}) on the top 5 %
        "rx-m10n30-auto-top5-lr1e-4": [
            "learner.lr=1e-4",
            *rx,
            "schedule.m=10",
            "schedule.n=30",
            "schedule.beta_mode=auto",
            "schedule.selection_fraction=0.05",
        ],
    }
    if args.configs:
        unknown = set(args.configs.split(",")) - set(configs)
        if unknown:
            ap.error(f"--configs: unknown {sorted(unknown)}; expected some of {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    db = RESULTS / "rl_extra_vs_grpo.db"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = from_db(db, configs, seeds)
    else:
        results = {}
        ray = start_ray()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for name, overrides in configs.items():
                    results[name] = [run_one(name, overrides, s, args.steps, args.eval_every, tmp, db) for s in seeds]
        finally:
            ray.shutdown()
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            print(
                f"{name:>32} seed {seed}: final {r['final']:.3f}  steps to {args.target}: "
                f"{steps_to(r['curve'], args.target)}  loop {r['wall_s']:.0f} s  "
                f"curve {[round(v, 3) for _, v in r['curve']]}",
                flush=True,
            )
            for p in r["projections"]:
                print(
                    f"{'':>34}step {p['rl_step']}: {p['outcome']} beta={p['beta']:.3g} drift "
                    f"{p['drift_share']:.3f} R2 {p['r2_median']:.3f} acc {p['acc_before']} -> {p['acc_after']}",
                    flush=True,
                )
    steps_budget = max(s for r in next(iter(results.values())) for s, _ in r["curve"])

    rows = {}
    for name, runs in results.items():
        hits = [steps_to(r["curve"], args.target) for r in runs]
        projections = [p for r in runs for p in r["projections"]]
        finite = lambda xs: [x for x in xs if x is not None and x == x]  # noqa: E731
        drift, r2 = finite(p["drift_share"] for p in projections), finite(p["r2_median"] for p in projections)
        jumps = finite(
            (p["acc_after"] - p["acc_before"]) if p["acc_after"] is not None and p["acc_before"] is not None else None
            for p in projections
            if p["outcome"] == "made"
        )
        rows[name] = {
            "steps_to_target": None if None in hits else sum(hits) / len(hits),
            "steps_to_target_per_seed": hits,
            "drift_share_mean": sum(drift) / len(drift) if drift else None,
            "r2_median_mean": sum(r2) / len(r2) if r2 else None,
            "acc_jump_per_projection_mean": sum(jumps) / len(jumps) if jumps else None,
            **{k: sum(r["counts"][k] for r in runs) for k in runs[0]["counts"]},
            "final_acc": sum(r["final"] for r in runs) / len(runs),
            "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
            "cycle_overhead_frac": (
                sum(r["mean_projection_s"] for r in runs) / sum(r["mean_step_s"] for r in runs)
                if runs[0]["mean_projection_s"] is not None
                else None
            ),
        }
    # GRPO at its own best lr: the most seeds reaching the target, then the fewest steps (mean over the seeds that
    # reach it), then the best final accuracy.
    grpo = {k: v for k, v in rows.items() if k.startswith("grpo")}

    def reached_mean(k):
        hits = [h for h in grpo[k]["steps_to_target_per_seed"] if h is not None]
        return sum(hits) / len(hits) if hits else 1e9

    best_grpo_name = min(
        grpo,
        key=lambda k: (
            -sum(h is not None for h in grpo[k]["steps_to_target_per_seed"]),
            reached_mean(k),
            -grpo[k]["final_acc"],
        ),
    )
    best_grpo = grpo[best_grpo_name]
    # Per seed: GRPO's steps / this config's steps. GRPO missing the target counts as budget + one eval interval
    # (so the ratio is a lower bound there); this config missing it while GRPO reached it counts as 0.
    for row in rows.values():
        ratios = []
        for g, r in zip(best_grpo["steps_to_target_per_seed"], row["steps_to_target_per_seed"]):
            if r is None:
                ratios.append(0.0 if g is not None else None)
            else:
                ratios.append((g if g is not None else steps_budget + args.eval_every) / r)
        known = [x for x in ratios if x is not None]
        row["step_ratio_per_seed"] = ratios
        row["step_ratio_vs_best_grpo"] = statistics.median(known) if known else None
        row["wall_ratio_vs_best_grpo"] = best_grpo["wall_s"] / row["wall_s"]
        row["final_acc_delta"] = row["final_acc"] - best_grpo["final_acc"]
    extra = {k: v for k, v in rows.items() if k.startswith("rx")}
    eligible = {k: v for k, v in extra.items() if v["step_ratio_vs_best_grpo"] and v["final_acc_delta"] >= -0.01}
    best = max(eligible, key=lambda k: eligible[k]["step_ratio_vs_best_grpo"]) if eligible else None
    _plot(results, args.target)
    emit(
        {
            "metric": "real_step_ratio_rl_extra_over_best_grpo",
            "goal": 6,
            "value": round(eligible[best]["step_ratio_vs_best_grpo"], 3) if best else 0.0,
            "best_config": best,
            "best_grpo": best_grpo_name,
            "target_acc": args.target,
            "seeds": seeds,
            "real_steps": steps_budget,
            "task": "toy_add 2-digit (procedure mixture), 32 prompts x 8 samples",
            "wall_ratio": round(rows[best]["wall_ratio_vs_best_grpo"], 3) if best else None,
            "final_acc_delta": round(rows[best]["final_acc_delta"], 4) if best else None,
            "cycle_overhead_frac": round(rows[best]["cycle_overhead_frac"], 4) if best else None,
            "configs": {
                k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                for k, v in rows.items()
            },
            "curves": {k: [r["curve"] for r in v] for k, v in results.items()},
            "projections": {k: [r["projections"] for r in v] for k, v in results.items() if k.startswith("rx")},
            "plot": str(RESULTS / "rl_extra_vs_grpo.png"),
        }
    )


def _plot(results, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        accs = [sum(r["curve"][i][1] for r in runs) / len(runs) for i in range(len(steps))]  # mean over seeds
        style = "-" if name.startswith("grpo") else "--"
        axes[0].plot(steps, accs, style, marker="o", ms=3, label=name)
        scale = sum(r["wall_s"] for r in runs) / len(runs) / max(steps)
        axes[1].plot([s * scale for s in steps], accs, style, marker="o", ms=3, label=name)
    for ax, xlabel in zip(axes, ("real RL steps", "wall time (s, approx.)")):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval Avg@4")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"RL-Extra vs GRPO (toy task, mean over {len(next(iter(results.values())))} seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "rl_extra_vs_grpo.png", dpi=120)


if __name__ == "__main__":
    main()
