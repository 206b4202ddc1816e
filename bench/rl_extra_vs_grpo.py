"""RL-Extra vs GRPO on the embedded toy task: eval accuracy against *real* RL steps and wall time, one run.

Every configuration starts from the same warm start and seed; GRPO gets a small learning-rate sweep so the
comparison is against GRPO at its own best lr. Eval (Avg@4 on held-out prompts) runs every `--eval-every`
real steps; for RL-Extra the eval grid is aligned with the cycle, so accuracy is seen just after each
projection. Reported per configuration: real steps to reach `--target` accuracy, the ratio to the best GRPO,
final accuracy, wall time, and (RL-Extra) the mean projection time as a fraction of an RL step.

Configurations: GRPO at two lrs, RL-Extra with fixed β at two (m, n), and adaptive β (line search on a
validation batch, with the reward guard). `auto` (the linearity monitor) is not built yet. One seed by default;
`--seeds 0,1,2` for more.

    python bench/rl_extra_vs_grpo.py [--steps 100] [--seeds 0] [--target 0.7]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common  # noqa: F401
from common import RESULTS, ROOT, emit, start_ray


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def run_one(name, overrides, seed, steps, eval_every, out_dir, db):
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    cfg = compose([
        f"seed={seed}", f"trainer.total_steps={steps}", f"trainer.eval_every={eval_every}", "trainer.eval_prompts=200",
        "trainer.progress=false", "trainer.save_final=false", f"trainer.output_dir={out_dir}/{name}-{seed}",
        f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=bench-rl-extra-vs-grpo",
        f"tracking.run_name={name}-seed{seed}", f"model.cache_dir={ROOT / '.cache' / 'rlextra'}", *overrides,
    ])
    start = time.perf_counter()
    summary = run_job(cfg, f"{out_dir}/{name}-{seed}")
    wall = time.perf_counter() - start
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    acc = sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], "eval/avg_at_k"))
    step_t = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "time/step_s")]
    extra_t = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "extra/time_s")]
    return {"curve": acc, "wall_s": wall, "final": acc[-1][1], "mean_step_s": sum(step_t) / len(step_t),
            "mean_projection_s": (sum(extra_t) / len(extra_t)) if extra_t else None,
            "virtual_steps": summary["virtual_steps"]}


def steps_to(curve, target):
    for step, value in curve:
        if value >= target:
            return step
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args()

    configs = {
        "grpo-lr3e-5": ["learner.lr=3e-5"],
        "grpo-lr6e-5": ["learner.lr=6e-5"],
        "rl_extra-m10n10-lr3e-5": ["learner.lr=3e-5", "schedule=rl_extra", "schedule.m=10", "schedule.n=10"],
        "rl_extra-m10n20-lr3e-5": ["learner.lr=3e-5", "schedule=rl_extra", "schedule.m=10", "schedule.n=20"],
        "rl_extra-m10n20-adaptive-lr3e-5": ["learner.lr=3e-5", "schedule=rl_extra", "schedule.m=10", "schedule.n=20",
                                            "schedule.beta_mode=adaptive", "schedule.candidates=[0.25,0.5,1.0]",
                                            "schedule.guard_margin=0.02"],
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    ray = start_ray()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = RESULTS / "rl_extra_vs_grpo.db"
            RESULTS.mkdir(parents=True, exist_ok=True)
            for name, overrides in configs.items():
                results[name] = [run_one(name, overrides, s, args.steps, args.eval_every, tmp, db) for s in seeds]
                r = results[name][0]
                print(f"{name:>24}: final {r['final']:.3f}  steps to {args.target}: {steps_to(r['curve'], args.target)}"
                      f"  wall {r['wall_s']:.0f} s  curve {[round(v, 3) for _, v in r['curve']]}", flush=True)
    finally:
        ray.shutdown()

    rows = {}
    for name, runs in results.items():
        hits = [steps_to(r["curve"], args.target) for r in runs]
        rows[name] = {
            "steps_to_target": None if None in hits else sum(hits) / len(hits),
            "final_acc": sum(r["final"] for r in runs) / len(runs),
            "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
            "cycle_overhead_frac": (sum(r["mean_projection_s"] for r in runs) / sum(r["mean_step_s"] for r in runs)
                                    if runs[0]["mean_projection_s"] is not None else None),
        }
    grpo = {k: v for k, v in rows.items() if k.startswith("grpo")}
    best_grpo_name = min(grpo, key=lambda k: (grpo[k]["steps_to_target"] or 1e9, -grpo[k]["final_acc"]))
    best_grpo = grpo[best_grpo_name]
    for name, row in rows.items():
        a, b = best_grpo["steps_to_target"], row["steps_to_target"]
        row["step_ratio_vs_best_grpo"] = (a / b) if a and b else None
        row["wall_ratio_vs_best_grpo"] = best_grpo["wall_s"] / row["wall_s"]
        row["final_acc_delta"] = row["final_acc"] - best_grpo["final_acc"]
    extra = {k: v for k, v in rows.items() if k.startswith("rl_extra")}
    eligible = {k: v for k, v in extra.items() if v["step_ratio_vs_best_grpo"] and v["final_acc_delta"] >= -0.01}
    best = max(eligible, key=lambda k: eligible[k]["step_ratio_vs_best_grpo"]) if eligible else None
    _plot(results, args.target)
    emit({"metric": "real_step_ratio_rl_extra_over_best_grpo", "goal": 6,
          "value": round(eligible[best]["step_ratio_vs_best_grpo"], 3) if best else 0.0,
          "best_config": best, "best_grpo": best_grpo_name, "target_acc": args.target, "seeds": seeds,
          "wall_ratio": round(rows[best]["wall_ratio_vs_best_grpo"], 3) if best else None,
          "final_acc_delta": round(rows[best]["final_acc_delta"], 4) if best else None,
          "cycle_overhead_frac": round(rows[best]["cycle_overhead_frac"], 4) if best else None,
          "configs": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in rows.items()},
          "curves": {k: v[0]["curve"] for k, v in results.items()},
          "plot": str(RESULTS / "rl_extra_vs_grpo.png")})


def _plot(results, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        steps, accs = zip(*runs[0]["curve"])
        style = "-" if name.startswith("grpo") else "--"
        axes[0].plot(steps, accs, style, marker="o", ms=3, label=name)
        scale = runs[0]["wall_s"] / max(steps)
        axes[1].plot([s * scale for s in steps], accs, style, marker="o", ms=3, label=name)
    for ax, xlabel in zip(axes, ("real RL steps", "wall time (s, approx.)")):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval Avg@4")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("RL-Extra vs GRPO (toy task, seed 0)")
    fig.tight_layout()
    fig.savefig(RESULTS / "rl_extra_vs_grpo.png", dpi=120)


if __name__ == "__main__":
    main()
