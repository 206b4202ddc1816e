"""The main job: RLVR training of a causal LM with vLLM rollout actors and DeepSpeed learner actors on Ray.

    python -m orchestrator.train                       # embedded defaults: tiny model, toy task, local Ray
    python -m orchestrator.train learner.lr=6e-5 trainer.total_steps=200
    python -m orchestrator.train model=hf data=files data.train_files=... cluster=existing

One RL step: prompts → rollouts (vLLM, behaviour log-probs at the sampling temperature) → rewards (verifiers,
scored in parallel worker processes) → advantages (GRPO by default) → one optimizer step on the learner group
(DeepSpeed ZeRO, micro-batched) → weight sync to every rollout engine (bucketed, versioned) → metrics.

Choices:
- Strictly on-policy: one optimizer step per rollout batch, and the behaviour log-probs from vLLM are the
  PPO `old_logp` (the learner recomputes the current ones at the same temperature).
- Evaluation on the held-out split reports greedy accuracy and Avg@k / Pass@k (k samples at the training
  temperature): on the toy task greedy picks the majority procedure, so Avg@k is the smooth signal.
- Everything is seeded; prompts are drawn by a checkpointable cursor; the learning rate advances by real step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import hydra
from omegaconf import DictConfig

from orchestrator.config import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def build_train_batch(result, advantages_per_sample, pad_id: int, temperature: float, device="cpu"):
    """Pad a RolloutResult into verl's layout: prompts left-padded, responses right-padded.

    advantages_per_sample: float[B] or float[B, R] (broadcast over each response's tokens).
    """
    import torch

    from actors.types import TrainBatch

    B = len(result.response_ids)
    P = max(len(p) for p in result.prompt_ids)
    R = max(1, max(len(r) for r in result.response_ids))
    prompts = torch.full((B, P), pad_id, dtype=torch.long)
    responses = torch.full((B, R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    rmask = torch.zeros((B, R), dtype=torch.float32)
    old_logp = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(result.prompt_ids, result.response_ids, result.logprobs)):
        prompts[i, P - len(p) :] = torch.tensor(p)
        attn[i, P - len(p) : P] = 1
        if r:
            responses[i, : len(r)] = torch.tensor(r)
            attn[i, P : P + len(r)] = 1
            rmask[i, : len(r)] = 1
            old_logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    adv = torch.as_tensor(advantages_per_sample, dtype=torch.float32)
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, R).clone()
    adv = adv[:, :R] * rmask
    return TrainBatch(prompts, responses, attn, rmask, old_logp, adv, temperature)


def shard_batch(batch, world_size: int) -> list:
    n = len(batch) // world_size
    return [batch.slice(r * n, (r + 1) * n) for r in range(world_size)]


class Job:
    """Holds the job's components; `run()` executes the loop. Separate from Hydra so tests can drive it."""

    def __init__(self, cfg: DictConfig, output_dir: str):
        self.cfg = cfg
        self.output_dir = output_dir
        self.log = _console

    # ----------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from orchestrator.cluster import init_ray, start_actor_groups
        from orchestrator.config import learner_spec, rollout_spec, validate
        from orchestrator.data import PromptCursor, PromptEncoder, load_splits, resolve_model
        from orchestrator.tracking import Tracker
        from verifiers.pool import ScoringPool

        from transformers.utils import logging as hf_logging

        cfg = self.cfg
        validate(cfg)
        hf_logging.disable_progress_bar()  # the job has its own progress bar
        t0 = time.perf_counter()
        self.model_path = resolve_model(cfg, log=self.log)
        self.train_ds, self.eval_ds = load_splits(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.encode = PromptEncoder(self.tokenizer, bool(cfg.data.apply_chat_template), cfg.data.max_prompt_tokens)
        self.cursor = PromptCursor(size=len(self.train_ds), seed=cfg.seed)
        n_eval = min(cfg.trainer.eval_prompts, len(self.eval_ds))
        self.eval_prompt_ids = [self.encode(self.eval_ds[i]["prompt"]) for i in range(n_eval)]
        self.eval_answers = [self.eval_ds[i]["answer"] for i in range(n_eval)]
        self.scorer = ScoringPool(max_workers=cfg.reward.num_workers, timeout_s=float(cfg.reward.timeout_s))
        self.tracker = Tracker(cfg)
        self.tracker.log_config(cfg)
        self.ray_started = init_ray(cfg)
        self.learner_spec = learner_spec(cfg, self.model_path)
        specs = [rollout_spec(cfg, self.model_path, i) for i in range(cfg.rollout.num_actors)]
        self.groups = start_actor_groups(cfg, self.learner_spec, specs)
        self.setup_time_s = time.perf_counter() - t0
        self.log(f"set-up done in {self.setup_time_s:.1f} s: model {self.model_path}, "
                 f"{len(self.train_ds)} train / {n_eval} eval prompts, MLflow run {self.tracker.run_id} at {self.tracker.uri}")

    # ------------------------------------------------------------------------------------------ pieces

    def sampling(self, n: int, greedy: bool = False, seed: int | None = None):
        from actors.types import SamplingConfig

        rc = self.cfg.rollout
        return SamplingConfig(
            n=n, temperature=0.0 if greedy else float(rc.temperature), top_p=float(rc.top_p),
            max_tokens=rc.max_tokens, seed=seed,
        )

    def evaluate(self) -> dict:
        k = self.cfg.trainer.eval_samples
        greedy = self.groups.generate(self.eval_prompt_ids, self.sampling(1, greedy=True))
        g_scores = self.scorer.score_batch(self.cfg.data.verifier, greedy.response_text, self.eval_answers)
        sampled = self.groups.generate(self.eval_prompt_ids, self.sampling(k, seed=self.cfg.seed + 12345))
        refs = [self.eval_answers[i] for i in sampled.prompt_index]
        s_scores = self.scorer.score_batch(self.cfg.data.verifier, sampled.response_text, refs)
        per_prompt = [s_scores[i * k : (i + 1) * k] for i in range(len(self.eval_answers))]
        correct = [sum(1 for s in row if s >= 1.0) for row in per_prompt]
        return {
            "eval/greedy_accuracy": sum(g_scores) / len(g_scores),
            "eval/avg_at_k": sum(s_scores) / len(s_scores),
            "eval/pass_at_k": sum(pass_at_k(k, c, k) for c in correct) / len(correct),
            "eval/response_length": sum(len(r) for r in sampled.response_ids) / len(sampled.response_ids),
        }

    def rl_step(self, step: int) -> dict:
        """One real RL step; returns its metrics."""
        import torch

        from actors.algorithms import get_advantage_fn

        cfg, tr = self.cfg, self.cfg.trainer
        times = {}
        t = time.perf_counter()
        idx = self.cursor.next(tr.prompts_per_step)
        rows = self.train_ds.select(idx)
        prompt_ids = [self.encode(p) for p in rows["prompt"]]
        answers = list(rows["answer"])
        result = self.groups.generate(prompt_ids, self.sampling(tr.samples_per_prompt, seed=cfg.seed * 100003 + step))
        times["time/rollout_s"] = time.perf_counter() - t

        t = time.perf_counter()
        refs = [answers[i] for i in result.prompt_index]
        rewards = self.scorer.score_batch(cfg.data.verifier, result.response_text, refs)
        times["time/reward_s"] = time.perf_counter() - t

        t = time.perf_counter()
        batch = build_train_batch(result, torch.zeros(len(rewards)), self.pad_id, float(cfg.rollout.temperature))
        adv_fn = get_advantage_fn(cfg.algo.advantage)
        batch.advantages = adv_fn(
            torch.tensor(rewards, dtype=torch.float32),
            torch.tensor(result.prompt_index, dtype=torch.long),
            batch.response_mask,
            eps=float(cfg.algo.eps),
            gamma=float(cfg.algo.gamma),
        ).float()
        metrics_per_rank = self.groups.train_step(shard_batch(batch, self.learner_spec.world_size))
        times["time/learn_s"] = time.perf_counter() - t

        t = time.perf_counter()
        sync = self.groups.sync_weights(float(cfg.rollout.bucket_mb))
        times["time/sync_s"] = time.perf_counter() - t

        n_tokens = int(batch.response_mask.sum())
        step_time = sum(times.values())
        m = {
            "train/reward_mean": sum(rewards) / len(rewards),
            "train/accuracy": sum(1 for r in rewards if r >= 1.0) / len(rewards),
            "train/response_length": n_tokens / len(rewards),
            "train/truncated_frac": 1.0 - sum(result.finished) / len(result.finished),
            "train/loss": _mean(x.loss for x in metrics_per_rank),
            "train/clip_frac": _mean(x.clip_frac for x in metrics_per_rank),
            "train/kl_behaviour": _mean(x.ppo_kl for x in metrics_per_rank),
            "train/entropy": _mean(x.entropy for x in metrics_per_rank),
            "train/kl_ref": _mean(x.extra["kl_ref"] for x in metrics_per_rank) if cfg.algo.kl_coef > 0 else None,
            "train/grad_norm": metrics_per_rank[0].grad_norm,
            "train/lr": metrics_per_rank[0].lr,
            "perf/tokens_per_s": n_tokens / max(times["time/rollout_s"], 1e-9),
            "perf/weight_version": sync["version"],
            "time/step_s": step_time,
            **times,
        }
        return m

    def save_checkpoint(self, step: int) -> str:
        ckpt_root = os.path.join(self.output_dir, "checkpoints")
        tag = f"rl_step_{step}"
        state = {"rl_step": step, "data_position": self.cursor.position, "weight_version": self.groups.weight_version}
        hf_dir = self.groups.call_learners("save_checkpoint", ckpt_root, tag, state)[0]
        with open(os.path.join(ckpt_root, tag, "rlextra_state.json"), "w") as f:
            json.dump(state, f)
        keep = self.cfg.trainer.keep_checkpoints
        if keep:
            tags = sorted(
                (d for d in os.listdir(ckpt_root) if d.startswith("rl_step_")), key=lambda d: int(d.split("_")[-1])
            )
            for old in tags[:-keep]:
                shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
        return hf_dir

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        from tqdm import tqdm

        cfg, tr = self.cfg, self.cfg.trainer
        start = time.perf_counter()
        before = self.evaluate()
        self.tracker.log_metrics(before, step=0)
        self.log(f"eval before training: greedy {before['eval/greedy_accuracy']:.3f}, "
                 f"avg@{tr.eval_samples} {before['eval/avg_at_k']:.3f}")
        last_eval = before
        bar = tqdm(range(1, tr.total_steps + 1), desc="rl", disable=not tr.progress, file=sys.stdout, dynamic_ncols=True)
        history = []
        extra = RLExtraSchedule(self) if cfg.schedule.name == "rl_extra" else None
        for step in bar:
            if extra:
                extra.before_step(step)
            m = self.rl_step(step)
            m["rl_step"] = step
            if extra:
                m.update(extra.after_step(step, m))
            else:
                m["virtual_step"] = step
            if tr.eval_every and step % tr.eval_every == 0 and step != tr.total_steps:
                last_eval = self.evaluate()
                m.update(last_eval)
            self.tracker.log_metrics(m, step=step)
            history.append({k: m[k] for k in ("train/reward_mean", "train/loss", "time/step_s")})
            bar.set_postfix(reward=f"{m['train/reward_mean']:.3f}", acc=f"{last_eval['eval/avg_at_k']:.3f}")
            if tr.checkpoint_every and step % tr.checkpoint_every == 0:
                self.save_checkpoint(step)
        bar.close()
        after = self.evaluate() if tr.total_steps else before
        self.tracker.log_metrics(after, step=tr.total_steps)
        final_ckpt = self.save_checkpoint(tr.total_steps) if tr.save_final else None
        wall = time.perf_counter() - start
        summary = {
            "rl_steps": tr.total_steps,
            "virtual_steps": extra.virtual_step if extra else tr.total_steps,
            "schedule": cfg.schedule.name,
            **(extra.counters if extra else {}),
            "eval_accuracy_before": before["eval/avg_at_k"],
            "eval_accuracy_after": after["eval/avg_at_k"],
            "eval_greedy_accuracy_before": before["eval/greedy_accuracy"],
            "eval_greedy_accuracy_after": after["eval/greedy_accuracy"],
            "eval_pass_at_k_before": before["eval/pass_at_k"],
            "eval_pass_at_k_after": after["eval/pass_at_k"],
            "eval_k": tr.eval_samples,
            "wall_time_s": wall,
            "setup_time_s": self.setup_time_s,
            "mean_step_time_s": _mean(h["time/step_s"] for h in history) if history else 0.0,
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "final_checkpoint": final_ckpt,
            "model_path": self.model_path,
        }
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        self.tracker.log_artifact(path)
        self.tracker.log_metrics({"summary/wall_time_s": wall}, step=tr.total_steps)
        print_summary(summary)
        return summary

    def close(self, status: str = "FINISHED") -> None:
        import ray

        # Close whatever set-up got as far as creating, in reverse order of dependence.
        for closer in (
            lambda: self.groups.shutdown() if hasattr(self, "groups") else None,
            lambda: self.scorer.close() if hasattr(self, "scorer") else None,
            lambda: self.tracker.finish(status) if hasattr(self, "tracker") else None,
            lambda: ray.shutdown() if getattr(self, "ray_started", False) else None,
        ):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                self.log(f"warning: shutdown step failed: {exc}")


class RLExtraSchedule:
    """Cycles of m real RL steps, then one in-place projection of every learner's fp32 master shard.

    β: `fixed` (schedule.beta, or (m + n) / m) or `adaptive` (a line search over fractions of that β, each
    candidate scored by reward on a fixed validation batch through the rollout engines; the best is kept only if
    it beats β = 1, i.e. not projecting). Guards: a projection that yields NaN/Inf, or whose validation reward
    falls more than `guard_margin` below the pre-projection reward, is rolled back and β shrinks for the next
    cycle. Each RL phase and each extrapolation phase is a nested MLflow run with its decisions."""

    def __init__(self, job: "Job"):
        self.job, s = job, job.cfg.schedule
        self.m, self.n = int(s.m), int(s.n)
        self.beta = float(s.beta) if s.beta is not None else (self.m + self.n) / self.m
        exclude = None if s.exclude is None else list(s.exclude)
        info = job.groups.call_learners("extra_setup", list(s.include), exclude, s.anchor_device)
        self.selected = sorted({n for i in info for n in i["selected"]})
        self.skipped = sorted({n for i in info for n in i["skipped"]})
        self.virtual_step = 0
        self.cycle = 0
        self.phase_run = None
        self.counters = {"projections_made": 0, "projections_skipped": 0, "projections_rolled_back": 0}
        self.validation = self._validation_batch() if s.beta_mode == "adaptive" or s.guard_margin is not None else None
        job.tracker.log_json({"projected": self.selected, "not_projected": self.skipped}, "rl_extra/tensors.json")

    def _validation_batch(self):
        """A fixed slice of the train split (never the held-out eval split) to score candidate projections."""
        import random

        s, ds = self.job.cfg.schedule, self.job.train_ds
        idx = random.Random(f"validation-{self.job.cfg.seed}").sample(range(len(ds)), min(s.validation_prompts, len(ds)))
        rows = ds.select(idx)
        return [self.job.encode(p) for p in rows["prompt"]], list(rows["answer"])

    def validation_reward(self) -> float:
        prompts, answers = self.validation
        k = self.job.cfg.schedule.validation_samples
        result = self.job.groups.generate(prompts, self.job.sampling(k, seed=self.job.cfg.seed + 777))
        scores = self.job.scorer.score_batch(self.job.cfg.data.verifier, result.response_text,
                                             [answers[i] for i in result.prompt_index])
        return sum(scores) / len(scores)

    def before_step(self, step: int) -> None:
        if (step - 1) % self.m == 0:  # a cycle starts: anchor = current weights
            self.cycle += 1
            self.job.groups.call_learners("extra_snapshot")
            self.phase_run = self.job.tracker.start_phase(
                f"rl-phase-{self.cycle}", "rl_phase", {"cycle": self.cycle, "first_rl_step": step, "m": self.m})

    def after_step(self, step: int, metrics: dict) -> dict:
        self.virtual_step += 1
        keep = ("train/reward_mean", "train/accuracy", "train/loss", "train/kl_behaviour", "time/step_s")
        self.job.tracker.log_phase_metrics(self.phase_run, {k: metrics[k] for k in keep}, step)
        out = {"virtual_step": self.virtual_step}
        if step % self.m == 0:
            self.job.tracker.end_phase(self.phase_run)
            out.update(self.extrapolate(step))
            out["virtual_step"] = self.virtual_step
        return out

    def _try(self, beta: float):
        """Project with β from the pre-projection weights and sync; returns the (all-reduced) stats."""
        groups = self.job.groups
        stats = groups.call_learners("extra_project", beta)[0]
        if stats.finite:
            groups.sync_weights(float(self.job.cfg.rollout.bucket_mb))
        return stats

    def _undo(self) -> None:
        self.job.groups.call_learners("extra_rollback")
        self.job.groups.sync_weights(float(self.job.cfg.rollout.bucket_mb))

    def extrapolate(self, step: int) -> dict:
        job, s = self.job, self.job.cfg.schedule
        run = job.tracker.start_phase(f"extrapolation-{self.cycle}", "extrapolation_phase",
                                      {"cycle": self.cycle, "beta_max": self.beta, "beta_mode": s.beta_mode,
                                       "m": self.m, "n": self.n, "rl_step": step,
                                       "tensors_projected": len(self.selected)})
        start = time.perf_counter()
        before = self.validation_reward() if self.validation else None
        decisions, tried = [], {}
        betas = [self.beta * f for f in s.candidates] if s.beta_mode == "adaptive" else [self.beta]
        betas = [b for b in betas if b > 1.0] or [self.beta]
        stats = None
        for i, beta in enumerate(betas):
            if i:
                job.groups.call_learners("extra_rollback")  # every candidate starts from the same weights
            stats = self._try(beta)
            if not stats.finite:
                decisions.append(f"beta={beta:.4g}: non-finite weights")
                tried[beta] = float("-inf")
                continue
            tried[beta] = self.validation_reward() if self.validation else float("nan")
        chosen = max(tried, key=lambda b: tried[b]) if self.validation else betas[0]
        ok = stats is not None and tried[chosen] != float("-inf")
        if ok and before is not None and s.beta_mode == "adaptive" and not tried[chosen] > before:
            decisions.append(f"no candidate beat beta=1 ({before:.3f}); keeping the unprojected weights")
            ok = False
        if ok and before is not None and s.guard_margin is not None and tried[chosen] < before - s.guard_margin:
            decisions.append(f"validation reward {tried[chosen]:.3f} < {before:.3f} - {s.guard_margin}: rolled back")
            ok = False
        if ok and s.beta_mode == "adaptive" and chosen != betas[-1]:
            job.groups.call_learners("extra_rollback")
            stats = self._try(chosen)
        rolled_back = not ok
        if rolled_back:
            self._undo()
            self.counters["projections_rolled_back"] += 1
            self.beta = 1.0 + (self.beta - 1.0) * s.shrink  # be more careful next cycle
            if not stats.finite and not s.guard_nan:
                raise RuntimeError("RL-Extra: projection produced NaN/Inf and schedule.guard_nan is off")
        else:
            self.counters["projections_made"] += 1
            self.virtual_step += round((chosen - 1.0) * self.m)
        elapsed = time.perf_counter() - start
        result = {
            "extra/beta": chosen if not rolled_back else 1.0,
            "extra/displacement_norm": stats.displacement_norm,
            "extra/projected_frac": stats.projected_numel / max(1, stats.total_numel),
            "extra/rolled_back": float(rolled_back),
            "extra/time_s": elapsed,
            "extra/val_reward_before": before,
            "extra/val_reward_after": (tried[chosen] if not rolled_back else before) if before is not None else None,
        }
        job.tracker.log_phase_metrics(run, {**result, "virtual_step": self.virtual_step}, step)
        job.tracker.log_json({"candidates": {str(b): r for b, r in tried.items()}, "chosen": chosen,
                              "rolled_back": rolled_back, "decisions": decisions},
                             f"rl_extra/extrapolation-{self.cycle}.json")
        job.tracker.end_phase(run)
        return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _console(msg: str) -> None:
    print(f"[rlextra] {msg}", flush=True)


def print_summary(summary: dict) -> None:
    rows = [
        ("real RL steps", summary["rl_steps"]),
        ("virtual steps", f"{summary['virtual_steps']} ({summary['schedule']})"),
        (f"eval Avg@{summary['eval_k']} before → after",
         f"{summary['eval_accuracy_before']:.3f} → {summary['eval_accuracy_after']:.3f}"),
        ("eval greedy accuracy before → after",
         f"{summary['eval_greedy_accuracy_before']:.3f} → {summary['eval_greedy_accuracy_after']:.3f}"),
        (f"eval Pass@{summary['eval_k']} before → after",
         f"{summary['eval_pass_at_k_before']:.3f} → {summary['eval_pass_at_k_after']:.3f}"),
        ("wall time (s)", f"{summary['wall_time_s']:.1f} (+{summary['setup_time_s']:.1f} set-up)"),
        ("mean step time (s)", f"{summary['mean_step_time_s']:.2f}"),
        ("MLflow run", f"{summary['mlflow_run_id']} ({summary['mlflow_tracking_uri']})"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40), flush=True)


def run_job(cfg: DictConfig, output_dir: str) -> dict:
    job = Job(cfg, output_dir)
    status = "FAILED"
    try:
        job.setup()
        summary = job.run()
        status = "FINISHED"
        return summary
    finally:
        job.close(status)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = cfg.trainer.output_dir or HydraConfig.get().runtime.output_dir
    os.makedirs(output_dir, exist_ok=True)
    try:
        run_job(cfg, output_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
