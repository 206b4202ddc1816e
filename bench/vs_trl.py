"""TRL's GRPOTrainer vs rlextra (`schedule=rl`) at equal work: seconds per optimizer step, side by side.

Equal work on both sides: the same `save_pretrained` model folder (built by the toy task code), the same toy_add
prompts in the same order (rlextra's seeded prompt cursor; TRL's dataset is given in that order, unshuffled),
32 prompts x 8 samples per optimizer step, the same response cap, temperature 1, top-p 1, no top-k, lr 1e-4
constant, AdamW (0.9, 0.999), gradient clip 1, no KL term, token-mean clipped loss (TRL `loss_type="dapo"`), 4
micro-batches of 64 samples, one optimizer step per generated batch, fp32. TRL 1.16 generates with transformers
`generate` (its default path, no vLLM) inside its training process; rlextra with its vLLM rollout actor and its
DeepSpeed learner rank on a local Ray.

Sizes: `toy` is the embedded default model (0.5M parameters, responses <= 8 tokens); `15m` is the tiny Qwen2 at
hidden 512, 8 layers, 8 heads (15M parameters, no warm start, responses <= 32 tokens).

Both sides run with OMP_WAIT_POLICY=PASSIVE (rlextra's actors' default, orchestrator/cluster.py): with libgomp's
spinning default a 2-thread torch process on a shared 2-core machine slows down up to ~7x, which would measure the
machine's other tenants rather than either trainer.

Each run is its own process, in the order A B B A per size (TRL, rlextra, rlextra, TRL), so a drift in the machine's
load hits both sides; the step times after `--warmup` steps are pooled per side and their medians compared.
A step's time is the wall time between consecutive optimizer-step ends (TRL: a trainer callback; rlextra: the
timestamps of each step's MLflow metrics), so logging counts on both sides. Phase split, per step (medians):
rlextra's own time/rollout_s, reward_s, learn_s, sync_s; TRL's generation (`_generate_single_turn`: transformers
`generate`), reward (`_calculate_rewards`) and optimization (the rest of the step: log-probs, loss, backward, the
optimizer), timed by wrapping those two methods. The work depends on the response length, and left free it
diverges by chance between the sides (see `job_config`), so every response is exactly the cap long on both sides
(`rollout.min_tokens` = `max_tokens`; TRL's `min_new_tokens`); both report each step's mean (`response_tokens`).
`--off-policy 1` adds a third side, rlextra with `trainer.off_policy_steps=1` (step t+1's rollout overlapped with
step t's learning), in the order A B C C B A.

    python bench/vs_trl.py                                  # both sizes (~15 min on this 2-core machine)
    python bench/vs_trl.py --sizes toy --steps 4 --warmup 2
    python bench/vs_trl.py --off-policy 1

Headline: TRL seconds per step ÷ rlextra seconds per step at the last size run (15m by default; goal >= 1.2).
TRL is pinned in pyproject's `dev` extra; it pulls nothing beyond what the project already pins.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (sets up sys.path and env)
from common import ROOT, emit

SIZES = {
    "toy": [],
    "15m": [
        "model.tiny.hidden_size=512",
        "model.tiny.num_layers=8",
        "model.tiny.num_heads=8",
        "model.tiny.num_kv_heads=8",
        "model.warm_start.steps=0",
        "rollout.max_tokens=32",
    ],
}
COMMON = [
    "schedule=rl",
    "trainer.prompts_per_step=32",
    "trainer.samples_per_prompt=8",
    "learner.micro_batch_size=64",
    "learner.lr=1e-4",
    "rollout.temperature=1.0",
    "rollout.top_p=1.0",
    f"model.cache_dir={ROOT / '.cache' / 'rlextra'}",
]
PHASES = {
    "rlextra": ("time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s"),
    "trl": ("generation_s", "reward_s", "optimization_s"),
}


def job_config(size: str, extra: list[str] = ()):
    """The size's config with every response exactly max_tokens long (EOS masked until then: vLLM min_tokens; TRL
    gets HF's min_new_tokens). Left free, lengths diverge by chance: the untrained 15M model's responses average ~14
    tokens; a step that happens to draw a few rewarded samples (a random string that contains the answer is more often
    a long one) makes one lr-sized Adam sign step, and from then on the responses run to the cap (rlextra's side,
    measured: 14.4 -> 31.2 -> 32 tokens after 2 rewarded samples of 256 at step 1; Adam's momentum keeps moving the
    weights while later steps' gradients are 0), while a side that drew none stays at ~14."""
    from orchestrator.config import compose, validate

    return validate(compose(COMMON + SIZES[size] + ["rollout.min_tokens=${rollout.max_tokens}", *extra]))


# ------------------------------------------------------------------------------------------------------ TRL


def run_trl(size: str, steps: int, workdir: str) -> dict:
    """TRL's GRPOTrainer for `steps` optimizer steps; per step: wall time and its phase split."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from orchestrator.data import PromptCursor, load_splits, resolve_model
    from verifiers.arith import score_arith

    cfg = job_config(size)
    tr, rc = cfg.trainer, cfg.rollout
    model_path = resolve_model(cfg, log=lambda *_: None)
    train = load_splits(cfg, None, log=lambda *_: None).train  # the rows rlextra trains on, checked the same way
    order = PromptCursor(len(train), cfg.seed).next(tr.prompts_per_step * steps)  # rlextra's prompts, in order
    dataset = train.select(order)

    def arith_reward(completions, answer, **_):
        return [score_arith(c, a) for c, a in zip(completions, answer)]

    phase = {"generation_s": 0.0, "reward_s": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                phase["generation_s"] += time.perf_counter() - t

        def _calculate_rewards(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                phase["reward_s"] += time.perf_counter() - t

    records: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not records:
                self.last = time.perf_counter()
            phase.update(generation_s=0.0, reward_s=0.0)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            wall = now - self.last
            self.last = now
            rest = wall - phase["generation_s"] - phase["reward_s"]
            records.append({"step_s": wall, **phase, "optimization_s": rest})

        def on_log(self, args, state, control, logs=None, **kwargs):  # after on_step_end, for the same step
            if records and logs and "completions/mean_length" in logs:
                records[-1]["response_tokens"] = logs["completions/mean_length"]

    micro = cfg.learner.micro_batch_size
    args = GRPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.batch_size // micro,
        num_generations=tr.samples_per_prompt,
        max_completion_length=rc.max_tokens,
        generation_kwargs={"min_new_tokens": rc.min_tokens},
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=0,
        learning_rate=cfg.learner.lr,
        lr_scheduler_type="constant",
        weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip,
        beta=0.0,
        num_iterations=1,
        epsilon=cfg.algo.clip_low,
        loss_type="dapo",
        max_steps=steps,
        shuffle_dataset=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=cfg.seed,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = TimedGRPOTrainer(
        model=model_path, reward_funcs=arith_reward, args=args, train_dataset=dataset, callbacks=[StepClock()]
    )
    trainer.train()
    return {"side": "trl", "steps": records, "model_path": model_path}


# -------------------------------------------------------------------------------------------------- rlextra


def run_rlextra(size: str, steps: int, workdir: str, off_policy: int) -> dict:
    """`python -m orchestrator.train` (through run_job) for `steps` RL steps; per step: wall time and phases."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    cfg = job_config(
        size,
        [
            f"trainer.total_steps={steps}",
            f"trainer.off_policy_steps={off_policy}",
            "trainer.eval_every=0",
            "trainer.eval_prompts=32",
            "trainer.eval_samples=1",
            "trainer.save_final=false",
            "trainer.progress=false",
            f"trainer.output_dir={workdir}",
            f"tracking.tracking_uri={uri}",
        ],
    )
    summary = run_job(cfg, workdir)
    client = MlflowClient(tracking_uri=uri)
    run_id = summary["mlflow_run_id"]
    history = {
        name: {m.step: m for m in client.get_metric_history(run_id, name)}
        for name in ("time/step_s", "train/response_length", *PHASES["rlextra"])
    }
    ends = sorted(history["time/step_s"].values(), key=lambda m: m.step)
    records = []
    for i, m in enumerate(ends):
        # the first step has no previous end: its own time/step_s stands for its wall time
        wall = m.value if i == 0 else (m.timestamp - ends[i - 1].timestamp) / 1000
        phases = {k: history[k][m.step].value for k in PHASES["rlextra"]}
        records.append({"step_s": wall, **phases, "response_tokens": history["train/response_length"][m.step].value})
    side = "rlextra" if not off_policy else "rlextra_off_policy"
    return {"side": side, "steps": records, "model_path": summary["model_path"]}


# ------------------------------------------------------------------------------------------------ the bench


def run_side(side: str, size: str, steps: int) -> dict:
    """One side in a fresh process (its own Ray, its own threads): the result of `--side`."""
    with tempfile.TemporaryDirectory(prefix=f"vs_trl-{side}-") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what rlextra's actors use; TRL gets it too (see the docstring)
        cmd = [sys.executable, __file__, "--side", side, "--sizes", size, "--steps", str(steps), "--out", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"vs_trl: the {side} run at size {size} failed (exit {proc.returncode})")
        with open(out) as f:
            result = json.load(f)
    result["process_s"] = time.perf_counter() - start
    return result


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per side: the median step time and phase times over the steps after the warm-up of every run."""
    out = {}
    for run in runs:
        out.setdefault(run["side"], []).extend(run["steps"][warmup:])
    return {
        side: {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]} | {"steps": len(rows)}
        for side, rows in out.items()
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="toy,15m", help="comma-separated: toy, 15m")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: toy 8, 15m 5)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the medians")
    ap.add_argument("--off-policy", type=int, default=0, choices=(0, 1), help="1: also rlextra off_policy_steps=1")
    ap.add_argument("--side", choices=("trl", "rlextra", "rlextra_off_policy"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    for size in sizes:
        if size not in SIZES:
            raise SystemExit(f"vs_trl: --sizes: expected names from {sorted(SIZES)}, got {size!r}")

    if args.side:  # one run, in its own process
        with tempfile.TemporaryDirectory() as workdir:
            if args.side == "trl":
                result = run_trl(sizes[0], args.steps, workdir)
            else:
                result = run_rlextra(sizes[0], args.steps, workdir, off_policy=int(args.side != "rlextra"))
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    sides = ["trl", "rlextra"] + (["rlextra_off_policy"] if args.off_policy else [])
    order = sides + sides[::-1]  # A B (C) (C) B A
    results = {}
    for size in sizes:
        steps = args.steps or {"toy": 8, "15m": 5}[size]
        runs = []
        for side in order:
            run = run_side(side, size, steps)
            print(f"{size} {side}: {json.dumps(run['steps'])} ({run['process_s']:.0f} s in all)", flush=True)
            runs.append(run)
        results[size] = summarize(runs, args.warmup)
        results[size]["model_path"] = runs[0]["model_path"]
        for side, stats in results[size].items():
            if side != "model_path":
                print(f"{size} {side}: {json.dumps(stats)}", flush=True)
    head = sizes[-1]
    ratio = {size: results[size]["trl"]["step_s"] / results[size]["rlextra"]["step_s"] for size in sizes}
    emit(
        {
            "metric": f"trl_over_rlextra_s_per_step_{head}",
            "value": round(ratio[head], 3),
            "goal": 1.2,
            "ratio_by_size": {size: round(r, 3) for size, r in ratio.items()},
            **(
                {
                    "ratio_off_policy_by_size": {
                        size: round(results[size]["trl"]["step_s"] / results[size]["rlextra_off_policy"]["step_s"], 3)
                        for size in sizes
                    }
                }
                if args.off_policy
                else {}
            ),
            "equal_work": "every response max_tokens long on both sides (rollout.min_tokens / min_new_tokens)",
            "sizes": results,
            "order": order,
            "warmup": args.warmup,
        }
    )


if __name__ == "__main__":
    main()
