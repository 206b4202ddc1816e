"""Fidelity of the linearity on the toy setup: does the embedded task reproduce the paper's figures?

One GRPO run on the toy default (data=toy_add, the default tiny model and learning rate) keeps a checkpoint
every `--every` steps; then, side by side in this one run:

1. **R² distributions** (paper Fig. 1a/b, 7, 8, 9): `orchestrator.analyze.analyze_run` over the warm start +
   every checkpoint — weights (sampled elements), token log-probs of fixed probe responses, activations.
2. **Direct weight extrapolation** (paper Fig. 5, the inverted U): from fixed (t0, t1) = (0, t1) for each
   `--t1`, `W' = W_0 + β (W_t1 − W_0)` with β = t′ / t1 for growing t′ (`orchestrator.extrapolate`, norm layers
   copied from t1), each evaluated, beside the real checkpoints' accuracy.
3. **Logits extrapolation** (paper Fig. 4): sample from `l_t0 + α (l_t1 − l_t0)` with (t0, t1) = (T/2, T)
   (`linearity.logits_extrapolation`) for growing α, against the last RL checkpoint T.

Every model — real checkpoints, extrapolated checkpoints, logits-extrapolated pairs — is evaluated by the same
code: `LogitsExtrapolationSampler` (a single checkpoint is the pair (m, m) with α = 1), `--k` samples per
held-out prompt at the training temperature (1.0, top-p 1), scored by the `arith` verifier; Avg@k with its
standard error over prompts. The headline is the share of sampled weights with R² > 0.7 (the paper: > 80 %);
`reproduces` says, claim by claim, where the toy matches the paper and where it does not.

    python bench/fidelity.py [--steps 60] [--every 5] [--t1 20 40] [--k 4] [--eval-prompts 300]

Writes bench/results/fidelity/{fidelity.png, analysis/*.png, analysis/linearity.json, fidelity.json}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sys.path, env)
from common import RESULTS, ROOT, emit

from orchestrator.models import load_causal_lm

OUT = RESULTS / "fidelity"


def compose(overrides):
    from orchestrator.config import compose as compose_job

    return compose_job(overrides)


# --------------------------------------------------------------------------------------------- training


def train(args, run_dir: Path, db: Path):
    """The plain GRPO run (schedule=rl: no in-loop extrapolation): a checkpoint every `args.every` steps, all kept."""
    from orchestrator.train import run_job

    cfg = compose([
        "schedule=rl", f"seed={args.seed}", f"trainer.total_steps={args.steps}",
        f"trainer.checkpoint_every={args.every}",
        "trainer.keep_checkpoints=0", "trainer.save_final=true", "trainer.eval_every=0", "trainer.eval_prompts=200",
        "trainer.progress=false", f"trainer.output_dir={run_dir}", f"tracking.tracking_uri=sqlite:///{db}",
        "tracking.experiment=bench-fidelity", f"model.cache_dir={ROOT / '.cache' / 'rlextra'}",
    ])  # fmt: skip
    start = time.perf_counter()
    summary = run_job(cfg, str(run_dir))
    from orchestrator.config import validate

    return validate(cfg), summary, time.perf_counter() - start  # the typed config (the toy task's dataclass)


# ------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Avg@k of a model pair (m0, m1, α) on fixed held-out prompts, one sampler for everything."""

    def __init__(self, cfg, tok, n_prompts: int, k: int, seed: int):
        from orchestrator.toy_task import write_toy_dataset

        rows = [
            json.loads(line)
            for line in open(write_toy_dataset(Path(cfg.model.cache_dir) / "data", cfg.data.toy, cfg.seed)["eval"])
        ]
        rows = rows[:n_prompts]
        self.prompts = [tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in rows]
        self.answers = [r["answer"] for r in rows]
        self.tok, self.k, self.seed = tok, k, seed
        self.max_tokens = int(cfg.rollout.max_tokens)
        self.temperature = float(cfg.rollout.temperature)

    def __call__(self, m0, m1, alpha: float) -> dict:
        from linearity.logits_extrapolation import LogitsExtrapolationSampler, SamplerConfig
        from verifiers import get_verifier

        score = get_verifier("arith")
        sampler = LogitsExtrapolationSampler(m0, m1, eos_ids=[self.tok.eos_token_id], pad_id=self.tok.pad_token_id)
        out = sampler.generate(
            self.prompts,
            SamplerConfig(
                alpha=alpha,
                n=self.k,
                temperature=self.temperature,
                top_p=1.0,
                max_tokens=self.max_tokens,
                seed=self.seed,
            ),
        )
        scores = [
            score(self.tok.decode(r, skip_special_tokens=True), self.answers[i])
            for i, r in zip(out.prompt_index, out.response_ids)
        ]
        per_prompt = [sum(scores[i * self.k : (i + 1) * self.k]) / self.k for i in range(len(self.prompts))]
        mean = sum(per_prompt) / len(per_prompt)
        var = sum((p - mean) ** 2 for p in per_prompt) / max(1, len(per_prompt) - 1)
        return {"avg_at_k": mean, "se": math.sqrt(var / len(per_prompt))}


def evaluate_real(ev: Evaluator, ckpts: dict[int, Path]) -> dict[int, dict]:
    out = {}
    for step, path in sorted(ckpts.items()):
        m = load_causal_lm(path)
        out[step] = ev(m, m, 1.0)
        print(f"  real step {step:>4}: Avg@{ev.k} {out[step]['avg_at_k']:.3f}", flush=True)
    return out


def weight_extrapolation(
    ev: Evaluator, ckpts: dict[int, Path], t1s, multiples, tmp: Path
) -> dict[int, dict[int, dict]]:
    """{t1: {t′: result}} for t′ = t1 · multiple, extrapolated from (0, t1)."""
    from orchestrator.extrapolate import extrapolate_checkpoint

    out = {}
    for t1 in t1s:
        out[t1] = {}
        for mult in multiples:
            target = int(round(t1 * mult))
            dst = tmp / f"extra_{t1}_{target}"
            extrapolate_checkpoint(
                ckpts[0],
                ckpts[t1],
                dst,
                beta=target / t1,
                t0_step=0,
                t1_step=t1,
                target_step=target,
                echo=lambda *_: None,
            )
            m = load_causal_lm(dst)
            out[t1][target] = ev(m, m, 1.0)
            shutil.rmtree(dst, ignore_errors=True)
            print(
                f"  weights (0, {t1}) → t′ {target:>4} (β {target / t1:.2f}): "
                f"Avg@{ev.k} {out[t1][target]['avg_at_k']:.3f}",
                flush=True,
            )
    return out


def logits_extrapolation(ev: Evaluator, ckpts: dict[int, Path], t0: int, t1: int, targets) -> dict[int, dict]:
    m0, m1 = load_causal_lm(ckpts[t0]), load_causal_lm(ckpts[t1])
    out = {}
    for target in targets:
        alpha = (target - t0) / (t1 - t0)
        out[target] = ev(m0, m1, alpha)
        print(
            f"  logits ({t0}, {t1}) → t′ {target:>4} (α {alpha:.2f}): Avg@{ev.k} {out[target]['avg_at_k']:.3f}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------ verdict


def verdict(analysis: dict, real: dict, wex: dict, lex: dict, last: int) -> dict:
    """Claim by claim: does the toy reproduce the paper? (True / False, with the numbers that decided it)."""
    w = analysis["weights"]["r2"]
    lp = analysis.get("logprobs", {})
    moved = lp.get("r2_moving", {})
    quart = lp.get("r2_by_change_quartile", [])
    claims = {
        "weights_linear (Fig. 1a: > 80 % of weights R² > 0.7)": (
            w["frac_above_0.7"] > 0.8,
            round(w["frac_above_0.7"], 3),
        ),
        "logprobs_linear (Fig. 1b: moved tokens' R² centred near 0.9)": (
            moved.get("median", 0) > 0.7,
            round(moved.get("median", float("nan")), 3),
        ),
        "larger_change_higher_r2 (§3.2)": (
            bool(quart) and quart[-1]["r2_mean"] > quart[0]["r2_mean"],
            [round(q["r2_mean"], 3) for q in quart],
        ),
    }
    for t1, curve in wex.items():
        targets = sorted(curve)
        accs = [curve[t]["avg_at_k"] for t in targets]
        peak = targets[accs.index(max(accs))]
        base = real[t1]
        gain = max(accs) - base["avg_at_k"]
        claims[f"inverted_u from (0, {t1}) (Fig. 5: rises past t1, then falls)"] = (
            peak != targets[-1] and gain > 2 * base["se"] and accs[-1] < max(accs) - 2 * curve[peak]["se"],
            {
                "peak_t": peak,
                "peak_acc": round(max(accs), 3),
                "acc_t1": round(base["avg_at_k"], 3),
                "acc_last_t": round(accs[-1], 3),
            },
        )
    if lex:
        best_t = max(lex, key=lambda t: lex[t]["avg_at_k"])
        gain = lex[best_t]["avg_at_k"] - real[last]["avg_at_k"]
        claims["logits_extrapolation_beats_last_checkpoint (Fig. 4)"] = (
            gain > 2 * real[last]["se"],
            {
                "best_t": best_t,
                "best_acc": round(lex[best_t]["avg_at_k"], 3),
                "last_acc": round(real[last]["avg_at_k"], 3),
            },
        )
    return {k: {"holds": bool(v[0]), "numbers": v[1]} for k, v in claims.items()}


# ---------------------------------------------------------------------------------------------------- plot


def plot(path: Path, real: dict, wex: dict, lex: dict, lex_pair, analysis: dict, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    steps = sorted(real)
    acc = [real[s]["avg_at_k"] for s in steps]
    se = [real[s]["se"] for s in steps]
    for ax in axes[1:]:
        ax.errorbar(steps, acc, yerr=se, color="black", marker="o", ms=3, lw=1.5, label="real RL checkpoints")
        ax.set_xlabel("step (t′ for extrapolations)")
        ax.set_ylabel(f"held-out Avg@{k}")
        ax.grid(alpha=0.3)
    for t1, curve in wex.items():
        ts = sorted(curve)
        axes[1].errorbar(
            ts,
            [curve[t]["avg_at_k"] for t in ts],
            yerr=[curve[t]["se"] for t in ts],
            marker="s",
            ms=3,
            ls="--",
            label=f"weights extrapolated from (0, {t1})",
        )
        axes[1].axvline(t1, color="grey", lw=0.6, ls=":")
    axes[1].set_title("direct weight extrapolation (paper Fig. 5)")
    axes[1].legend(fontsize=8)
    if lex:
        ts = sorted(lex)
        axes[2].errorbar(
            ts,
            [lex[t]["avg_at_k"] for t in ts],
            yerr=[lex[t]["se"] for t in ts],
            marker="^",
            ms=4,
            ls="--",
            color="#D55E00",
            label=f"logits extrapolated from {lex_pair}",
        )
    axes[2].set_title("logits extrapolation vs the last checkpoint (paper Fig. 4)")
    axes[2].legend(fontsize=8)
    w = analysis["weights"]["r2"]["histogram"]
    centres = (np.array(w["bin_edges"][:-1]) + np.array(w["bin_edges"][1:])) / 2
    axes[0].bar(
        centres,
        np.array(w["counts"]) / max(1, sum(w["counts"])),
        width=0.048,
        color="#0072B2",
        alpha=0.7,
        label="weights",
    )
    lp = analysis.get("logprobs", {}).get("r2_moving", {}).get("histogram")
    if lp:
        axes[0].bar(
            centres,
            np.array(lp["counts"]) / max(1, sum(lp["counts"])),
            width=0.03,
            color="#009E73",
            alpha=0.7,
            label="token log-probs (moved)",
        )
    axes[0].axvline(0.7, color="black", ls="--", lw=1)
    axes[0].set_xlabel("R²")
    axes[0].set_ylabel("share")
    axes[0].set_title("R² of weights and token log-probs (paper Fig. 1)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--t1", type=int, nargs="+", default=[20, 40], help="t1 values for weight extrapolation (t0 = 0)")
    ap.add_argument("--multiples", type=float, nargs="+", default=[1.5, 2, 3, 4, 6], help="t′ = t1 × these")
    ap.add_argument("--logit-targets", type=float, nargs="+", default=[1.25, 1.5, 2, 3], help="t′ = T × these")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (Avg@k)")
    ap.add_argument("--eval-prompts", type=int, default=300)
    ap.add_argument(
        "--weight-fraction",
        type=float,
        default=0.02,
        help="share of each tensor sampled (0.1 %% is ~500 elements here)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for t1 in args.t1:
        if t1 % args.every or not 0 < t1 <= args.steps:
            ap.error(
                f"--t1 {t1}: expected a checkpoint step (a multiple of --every {args.every} up to --steps {args.steps})"
            )

    import torch

    from orchestrator.analyze import analyze_run, discover_run_checkpoints

    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cfg, summary, train_s = train(args, tmp / "run", tmp / "mlflow.db")
        print(
            f"trained {args.steps} steps in {train_s:.0f} s (Avg@4 {summary['eval_accuracy_before']:.3f} → "
            f"{summary['eval_accuracy_after']:.3f})",
            flush=True,
        )
        series = discover_run_checkpoints(tmp / "run")
        ckpts = {int(c.step): c.path for c in series}
        missing = sorted({0, args.steps, *args.t1} - set(ckpts))
        if missing:
            raise SystemExit(f"fidelity: the run left no checkpoint for step(s) {missing} (found {sorted(ckpts)})")
        from orchestrator.toy_task import write_toy_dataset

        eval_rows = [
            json.loads(line)
            for line in open(write_toy_dataset(Path(cfg.model.cache_dir) / "data", cfg.data.toy, cfg.seed)["eval"])
        ]
        t = time.perf_counter()
        analysis = analyze_run(series, OUT / "analysis", {"weight_fraction": args.weight_fraction, "num_probes": 64,
                               "samples_per_probe": 2, "probe_max_tokens": int(cfg.rollout.max_tokens)},
                               prompts=[r["prompt"] for r in eval_rows[-64:]], log=lambda *_: None)  # fmt: skip
        analysis_s = time.perf_counter() - t
        print(f"analysis in {analysis_s:.0f} s", flush=True)

        from transformers import AutoTokenizer

        ev = Evaluator(cfg, AutoTokenizer.from_pretrained(str(ckpts[0])), args.eval_prompts, args.k, args.seed)
        t = time.perf_counter()
        real = evaluate_real(ev, {s: p for s, p in ckpts.items() if s % (2 * args.every) == 0 or s == args.steps})
        for t1 in args.t1:
            if t1 not in real:
                real[t1] = ev(load_causal_lm(ckpts[t1]), load_causal_lm(ckpts[t1]), 1.0)
        wex = weight_extrapolation(ev, ckpts, args.t1, args.multiples, tmp)
        T = args.steps
        t0_logit = (T // 2) // args.every * args.every
        lex = logits_extrapolation(ev, ckpts, t0_logit, T, [int(round(T * m)) for m in args.logit_targets])
        eval_s = time.perf_counter() - t

    checks = verdict(analysis, real, wex, lex, T)
    plot(OUT / "fidelity.png", real, wex, lex, (t0_logit, T), analysis, args.k)
    w = analysis["weights"]["r2"]
    lp = analysis.get("logprobs", {})
    result = {
        "metric": "weight_r2_frac_above_0.7", "value": round(w["frac_above_0.7"], 4), "goal": 0.8,
        "weight_r2_median": round(w["median"], 4), "weights_kept": w["count"],
        "weights_sampled": analysis["weights"]["elements_sampled"],
        "logprob_r2_median_moved": round(lp.get("r2_moving", {}).get("median", float("nan")), 4),
        "logprob_frac_above_0.7_moved": round(lp.get("r2_moving", {}).get("frac_above_0.7", float("nan")), 4),
        "logprob_groups": {g: v["count"] for g, v in lp.get("groups", {}).items()},
        "activation_r2_mean_per_layer": [
            None if m is None else round(m, 3) for m in analysis.get("activations", {}).get("per_layer_mean", [])
        ],
        "reproduces": checks,
        "real_avg_at_k": {s: round(r["avg_at_k"], 4) for s, r in sorted(real.items())},
        "weight_extrapolation": {t1: {t: round(r["avg_at_k"], 4) for t, r in c.items()} for t1, c in wex.items()},
        "logits_extrapolation": {"pair": [t0_logit, T], **{t: round(r["avg_at_k"], 4) for t, r in lex.items()}},
        "avg_at_k_se": round(max(r["se"] for r in real.values()), 4), "k": args.k, "eval_prompts": args.eval_prompts,
        "steps": args.steps, "checkpoint_every": args.every, "lr": float(cfg.learner.lr), "seed": args.seed,
        "seconds": {"train": round(train_s), "analysis": round(analysis_s), "eval": round(eval_s),
                    "total": round(time.perf_counter() - started)},
        "plots": [str(OUT / "fidelity.png"), str(OUT / "analysis" / "overview.png")],
    }  # fmt: skip
    (OUT / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
    for claim, v in checks.items():
        print(f"{'reproduced' if v['holds'] else 'NOT reproduced':>15}: {claim} {v['numbers']}")
    emit(result)


if __name__ == "__main__":
    main()
