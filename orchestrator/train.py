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

from orchestrator.checkpoints import (
    checkpoint_root,
    checkpoint_tag,
    complete_checkpoints,
    newest_checkpoint,
    write_state,
)
from orchestrator.config import ConfigError
from orchestrator.console import console
from orchestrator.metrics import sample_metrics


def build_train_batch(result, advantages_per_sample, pad_id: int, temperature: float, device="cpu"):
    """Pad a RolloutResult into verl's layout: prompts left-padded, responses right-padded.

    advantages_per_sample: float[B] or float[B, R] (broadcast over each response's tokens).
    """
    import torch

    from orchestrator.messages import TrainBatch

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
        self.log = console
        self.extra = None
        self.resume = None
        self.learner_restarts = 0

    # ----------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from orchestrator.cluster import init_ray, start_actor_groups
        from orchestrator.config import learner_spec, rollout_spec, validate
        from orchestrator.data import PromptCursor, PromptEncoder, load_splits, resolve_model
        from orchestrator.tracking import Tracker
        from verifiers.pool import ScoringPool

        cfg = self.cfg
        validate(cfg)
        hf_logging.disable_progress_bar()  # the job has its own progress bar
        t0 = time.perf_counter()
        self.model_path = resolve_model(cfg, log=self.log)
        self.train_ds, self.eval_ds = load_splits(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.encode = PromptEncoder(self.tokenizer, bool(cfg.data.apply_chat_template), cfg.data.max_prompt_tokens)
        self.cursor = PromptCursor(size=len(self.train_ds), seed=cfg.seed)
        n_eval = min(cfg.trainer.eval_prompts, len(self.eval_ds))
        self.eval_prompt_ids = [self.encode(self.eval_ds[i]["prompt"]) for i in range(n_eval)]
        self.eval_answers = [self.eval_ds[i]["answer"] for i in range(n_eval)]
        self.scorer = ScoringPool(max_workers=cfg.reward.num_workers, timeout_s=float(cfg.reward.timeout_s))
        self.resume = self.resume_state()
        if self.resume:  # the same MLflow run continues; steps it already holds are not logged twice
            self.tracker = Tracker(cfg, resume_run_id=self.resume[1]["mlflow_run_id"])
        else:
            self.tracker = Tracker(cfg)
            self.tracker.log_config(cfg)
        self.ray_started = init_ray(cfg)
        self.learner_spec = learner_spec(cfg, self.model_path)
        specs = [rollout_spec(cfg, self.model_path, i) for i in range(cfg.rollout.num_actors)]
        self.groups = start_actor_groups(cfg, self.learner_spec, specs)
        self.setup_time_s = time.perf_counter() - t0
        self.log(
            f"set-up done in {self.setup_time_s:.1f} s: model {self.model_path}, "
            f"{len(self.train_ds)} train / {n_eval} eval prompts, "
            f"MLflow run {self.tracker.run_id} at {self.tracker.uri}"
        )

    # ------------------------------------------------------------------------------------------ pieces

    def sampling(self, n: int, greedy: bool = False, seed: int | None = None):
        from orchestrator.messages import SamplingConfig

        rc = self.cfg.rollout
        return SamplingConfig(
            n=n,
            temperature=0.0 if greedy else float(rc.temperature),
            top_p=float(rc.top_p),
            max_tokens=rc.max_tokens,
            seed=seed,
        )

    def evaluate(self) -> dict:
        k = self.cfg.trainer.eval_samples
        greedy = self.groups.generate(self.eval_prompt_ids, self.sampling(1, greedy=True))
        g_scores = self.scorer.score_batch(self.cfg.data.verifier, greedy.response_text, self.eval_answers)
        sampled = self.groups.generate(self.eval_prompt_ids, self.sampling(k, seed=self.cfg.seed + 12345))
        refs = [self.eval_answers[i] for i in sampled.prompt_index]
        s_scores = self.scorer.score_batch(self.cfg.data.verifier, sampled.response_text, refs)
        sampled_metrics = sample_metrics(s_scores, k)
        return {
            "eval/greedy_accuracy": sum(g_scores) / len(g_scores),
            "eval/avg_at_k": sampled_metrics["avg_at_k"],
            "eval/pass_at_k": sampled_metrics["pass_at_k"],
            "eval/response_length": sum(len(r) for r in sampled.response_ids) / len(sampled.response_ids),
        }

    def rl_step(self, step: int) -> dict:
        """One real RL step; returns its metrics."""
        import torch

        from orchestrator.algorithms import get_advantage_fn

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
            "cluster/rollout_restarts": self.groups.rollout_restarts,
            "time/step_s": step_time,
            **times,
        }
        return m

    def save_checkpoint(self, step: int) -> str:
        """Model + optimizer + LR schedule per rank (DeepSpeed), RL-Extra anchors and statistics per rank, and
        `rlextra_state.json` (step counters, data position, schedule position, RNG, MLflow run), written last:
        a checkpoint without it is incomplete and never resumed from."""
        import random

        ckpt_root = checkpoint_root(self.output_dir)
        tag = checkpoint_tag(step)
        state = {
            "rl_step": step,
            "data_position": self.cursor.position,
            "weight_version": self.groups.weight_version,
            "mlflow_run_id": self.tracker.run_id,
            "eval_before": self.eval_before,
            "step_times": self.step_times,
            "schedule": self.extra.state() if self.extra else None,
            "python_rng": _jsonable(random.getstate()),
        }
        hf_dir = self.groups.call_learners("save_checkpoint", ckpt_root, tag, {"rl_step": step})[0]
        write_state(os.path.join(ckpt_root, tag), state)
        keep = self.cfg.trainer.keep_checkpoints
        if keep:
            for old in complete_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
        return hf_dir

    def resume_state(self) -> tuple[str, dict] | None:
        """The newest complete checkpoint when trainer.resume=auto, else None."""
        return newest_checkpoint(checkpoint_root(self.output_dir)) if self.cfg.trainer.resume == "auto" else None

    def restore(self, tag: str, state: dict) -> int:
        """Load a checkpoint into the live job; returns the next RL step."""
        import random

        root = checkpoint_root(self.output_dir)
        self.groups.call_learners("load_checkpoint", root, tag)
        self.cursor.position = int(state["data_position"])
        self.groups.weight_version = int(state["weight_version"])
        self.groups.sync_weights(float(self.cfg.rollout.bucket_mb))  # the engines still hold the initial weights
        self.eval_before = state["eval_before"]
        self.step_times = list(state.get("step_times", []))
        random.setstate(_from_jsonable(state["python_rng"]))
        if self.extra and state.get("schedule"):
            self.extra.load_state(state["schedule"])
        self.log(
            f"resumed from {os.path.join(root, tag)} (rl_step {state['rl_step']}, "
            f"data position {self.cursor.position}, MLflow run {self.tracker.run_id})"
        )
        return int(state["rl_step"]) + 1

    def analyze_own_checkpoints(self) -> dict:
        """analysis.enabled: R² of weights, token log-probs and activations over this job's checkpoints (the
        starting model as step 0 when it is a local directory); JSON + PNGs under output_dir/linearity and as
        MLflow artifacts. Returns the headline numbers for the summary."""
        from orchestrator.analyze import analyze_run, discover_run_checkpoints

        found = [(c.step, str(c.path)) for c in discover_run_checkpoints(self.output_dir, include_base=False)]
        if os.path.isdir(self.model_path):
            found = [(0.0, self.model_path)] + found
        a = self.cfg.analysis
        options = {k: a[k] for k in ("weight_fraction", "num_probes", "samples_per_probe", "plots")}
        prompts = [self.eval_ds[i]["prompt"] for i in range(min(int(a.num_probes), len(self.eval_ds)))]
        result = analyze_run(
            found,
            os.path.join(self.output_dir, "linearity"),
            options,
            prompts=prompts,
            chat_template=bool(self.cfg.data.apply_chat_template),
            mlflow_run_id=self.tracker.run_id,
            tracking_uri=self.tracker.uri,
            log=self.log,
        )
        r2 = result.get("weights", {}).get("r2", {})
        return {
            "checkpoints": len(found),
            "weights_r2_median": r2.get("median"),
            "weights_frac_above_0_7": r2.get("frac_above_0.7"),
            "output": os.path.join(self.output_dir, "linearity"),
        }

    def one_step(self, step: int) -> dict:
        """One real RL step with its RL-Extra bookkeeping (anchor before, extrapolation phase after)."""
        if self.extra:
            self.extra.before_step(step)
        m = self.rl_step(step)
        m["rl_step"] = step
        if self.extra:
            m.update(self.extra.after_step(step, m))
        else:
            m["virtual_step"] = step
        return m

    # ---------------------------------------------------------------------------------------- failures

    def learner_died(self, exc: Exception) -> bool:
        """Did `exc` come from a learner rank that is gone? (pings every rank; a dead one fails at once)"""
        import ray
        from ray.exceptions import RayActorError

        if not isinstance(exc, RayActorError) and "RayActorError" not in type(exc).__name__:
            return False
        for learner in self.groups.learners:
            try:
                ray.get(learner.ping.remote(), timeout=60)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                return True
        return False

    def recover_learners(self, failed_step: int, exc: Exception) -> int:
        """Restart the learner group, reload the newest complete checkpoint (or the initial weights), and
        return the step to continue from. Steps already logged are replayed identically but not logged twice."""
        limit = int(self.cfg.trainer.max_learner_restarts)
        self.learner_restarts += 1
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if self.learner_restarts > limit:
            raise RuntimeError(
                f"learner group failed at rl_step {failed_step} and no restart is left "
                f"(trainer.max_learner_restarts={limit}): {reason}"
            ) from exc
        self.log(
            f"learner rank died at rl_step {failed_step} ({reason}); restarting the learner group "
            f"({self.learner_restarts}/{limit})"
        )
        self.groups.restart_learners()
        if self.extra:
            self.extra.setup_learners()
        self.tracker.prepare_replay(failed_step - 1)
        found = newest_checkpoint(checkpoint_root(self.output_dir))
        if found:
            return self.restore(*found)
        self.log("no checkpoint yet: starting again from the initial weights")
        self.cursor.position = 0
        self.step_times = []
        self.groups.sync_weights(float(self.cfg.rollout.bucket_mb))
        if self.extra:
            self.extra.reset_state()
        return 1

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        from tqdm import tqdm

        cfg, tr = self.cfg, self.cfg.trainer
        start = time.perf_counter()
        self.extra = RLExtraSchedule(self) if cfg.schedule.name == "rl_extra" else None
        self.step_times: list[float] = []
        first_step = 1
        if self.resume:
            first_step = self.restore(*self.resume)
            before = self.eval_before
        else:
            before = self.eval_before = self.evaluate()
            self.tracker.log_metrics(before, step=0)
            self.log(
                f"eval before training: greedy {before['eval/greedy_accuracy']:.3f}, "
                f"avg@{tr.eval_samples} {before['eval/avg_at_k']:.3f}"
            )
        last_eval = before
        bar = tqdm(
            total=tr.total_steps,
            initial=first_step - 1,
            desc="rl",
            disable=not tr.progress,
            file=sys.stdout,
            dynamic_ncols=True,
        )
        step = first_step
        while step <= tr.total_steps:
            try:
                m = self.one_step(step)
            except Exception as exc:  # a dead learner rank: restart the group from the last checkpoint
                if not self.learner_died(exc):
                    raise
                step = self.recover_learners(step, exc)
                bar.n = step - 1
                bar.refresh()
                continue
            if tr.eval_every and step % tr.eval_every == 0 and step != tr.total_steps:
                last_eval = self.evaluate()
                m.update(last_eval)
            self.tracker.log_metrics(m, step=step)
            self.step_times.append(m["time/step_s"])
            bar.update(1)
            bar.set_postfix(reward=f"{m['train/reward_mean']:.3f}", acc=f"{last_eval['eval/avg_at_k']:.3f}")
            if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step != tr.total_steps:
                self.save_checkpoint(step)
            step += 1
        bar.close()
        if self.extra:
            self.extra.finish()
        after = self.evaluate() if tr.total_steps else before
        self.tracker.log_metrics(after, step=tr.total_steps)
        final_ckpt = self.save_checkpoint(tr.total_steps) if tr.save_final else None
        linearity = self.analyze_own_checkpoints() if cfg.get("analysis") is not None and cfg.analysis.enabled else None
        wall = time.perf_counter() - start
        summary = {
            "rl_steps": tr.total_steps,
            "virtual_steps": self.extra.virtual_step if self.extra else tr.total_steps,
            "schedule": cfg.schedule.name,
            **(self.extra.counters if self.extra else {}),
            "eval_accuracy_before": before["eval/avg_at_k"],
            "eval_accuracy_after": after["eval/avg_at_k"],
            "eval_greedy_accuracy_before": before["eval/greedy_accuracy"],
            "eval_greedy_accuracy_after": after["eval/greedy_accuracy"],
            "eval_pass_at_k_before": before["eval/pass_at_k"],
            "eval_pass_at_k_after": after["eval/pass_at_k"],
            "eval_k": tr.eval_samples,
            "resumed_from_step": first_step - 1 if self.resume else None,
            "learner_restarts": self.learner_restarts,
            "rollout_restarts": getattr(self.groups, "rollout_restarts", 0),
            "wall_time_s": wall,
            "setup_time_s": self.setup_time_s,
            "mean_step_time_s": _mean(self.step_times) if self.step_times else 0.0,
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "final_checkpoint": final_ckpt,
            "model_path": self.model_path,
        }
        if linearity is not None:
            summary["linearity"] = linearity
        if self.extra:
            summary["extrapolations"] = self.extra.records
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, default=str)
        self.tracker.log_artifact(path)
        self.tracker.log_metrics({"summary/wall_time_s": wall}, step=tr.total_steps)
        print_summary(summary)
        return summary

    def close(self, status: str = "FINISHED") -> None:
        import ray

        # Close whatever set-up got as far as creating, in reverse order of dependence.
        for closer in (
            lambda: self.extra.close() if getattr(self, "extra", None) else None,
            lambda: self.groups.shutdown() if hasattr(self, "groups") else None,
            lambda: self.scorer.close() if hasattr(self, "scorer") else None,
            lambda: self.tracker.finish(status) if hasattr(self, "tracker") else None,
            lambda: ray.shutdown() if getattr(self, "ray_started", False) else None,
        ):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                self.log(f"warning: shutdown step failed: {exc}")


def extrapolation_config(schedule) -> ExtrapolationConfig:
    from actors.extrapolator import ExtrapolationConfig

    s = schedule
    return ExtrapolationConfig(
        m=int(s.m),
        n=int(s.n),
        beta_mode=str(s.beta_mode),
        beta=None if s.beta is None else float(s.beta),
        anchor=str(s.anchor),
        candidates=tuple(float(c) for c in s.candidates),
        monitor_threshold=float(s.monitor_threshold),
        monitor_r2=None if s.monitor_r2 is None else float(s.monitor_r2),
        selection=str(s.selection),
        selection_threshold=float(s.selection_threshold),
        selection_fraction=float(s.selection_fraction),
        guard_nan=bool(s.guard_nan),
        guard_margin=None if s.guard_margin is None else float(s.guard_margin),
        shrink=float(s.shrink),
        optimizer=str(s.optimizer),
    )


class RLExtraSchedule:
    """The driver's side of RL-Extra: cycles of m real RL steps, each ended by an extrapolation phase that the
    `ExtrapolatorActor` (actors/extrapolator.py) decides and carries out on the learners' shards.

    The driver snapshots the anchors (at the cycle start, or one step before its end for `previous_step`),
    counts `virtual_step` (+ (β − 1) · span per projection made), and logs: a nested MLflow run per RL phase
    (`rl-phase-k`: the cycle's training metrics) and per extrapolation phase (`extrapolation-k`: β, tensors and
    elements projected, displacement norm, drift share, R², validation reward before/after, guard decisions,
    time), plus `rl_extra/extrapolation-k.json` with every candidate and reason."""

    def __init__(self, job: Job):
        import ray

        from actors.extrapolator import ExtrapolatorActor

        self.job, s = job, job.cfg.schedule
        self.xcfg = extrapolation_config(s)
        self.m = self.xcfg.m
        self.setup_learners()
        self.reset_state()
        validation = self._validation_batch() if self.xcfg.needs_validation else None
        sampling = job.sampling(int(s.validation_samples), seed=job.cfg.seed + 777)
        self.actor = (
            ray.remote(ExtrapolatorActor)
            .options(num_cpus=0, max_concurrency=1)
            .remote(
                self.xcfg,
                validation,
                sampling,
                str(job.cfg.data.verifier),
                float(job.cfg.reward.timeout_s),
                float(job.cfg.rollout.bucket_mb),
            )
        )
        job.tracker.log_json({"projected": self.selected, "not_projected": self.skipped}, "rl_extra/tensors.json")

    def setup_learners(self) -> None:
        """Give every learner rank its projector (at start, and after a learner group restart)."""
        s = self.job.cfg.schedule
        exclude = None if s.exclude is None else list(s.exclude)
        info = self.job.groups.call_learners(
            "extra_setup", list(s.include), exclude, s.anchor_device, str(s.velocity), int(s.monitor_samples)
        )
        self.selected = sorted({n for i in info for n in i["selected"]})
        self.skipped = sorted({n for i in info for n in i["skipped"]})

    def reset_state(self) -> None:
        self.virtual_step = 0
        self.cycle = 0
        self.phase_run = None
        self.counters = {"projections_made": 0, "projections_skipped": 0, "projections_rolled_back": 0}
        self.records: list[dict] = []
        if hasattr(self, "actor"):
            import ray

            from actors.extrapolator import ExtrapolationPolicy

            ray.get(self.actor.load_state.remote({"beta_max": ExtrapolationPolicy(self.xcfg).beta_max}))

    def _validation_batch(self):
        """A fixed slice of the train split (never the held-out eval split) to score candidate projections."""
        import random

        s, ds = self.job.cfg.schedule, self.job.train_ds
        idx = random.Random(f"validation-{self.job.cfg.seed}").sample(
            range(len(ds)), min(s.validation_prompts, len(ds))
        )
        rows = ds.select(idx)
        return [self.job.encode(p) for p in rows["prompt"]], list(rows["answer"])

    # ------------------------------------------------------------------------------------------ the loop

    def before_step(self, step: int) -> None:
        first, last = (step - 1) % self.m == 0, step % self.m == 0
        if first:
            self.cycle += 1
            self.phase_run = self.job.tracker.start_phase(
                f"rl-phase-{self.cycle}", "rl_phase", {"cycle": self.cycle, "first_rl_step": step, "m": self.m}
            )
        if (first and self.xcfg.anchor == "cycle_start") or (last and self.xcfg.anchor == "previous_step"):
            self.job.groups.call_learners("extra_snapshot")

    def after_step(self, step: int, metrics: dict) -> dict:
        self.virtual_step += 1
        keep = ("train/reward_mean", "train/accuracy", "train/loss", "train/kl_behaviour", "time/step_s")
        self.job.tracker.log_phase_metrics(self.phase_run, {k: metrics[k] for k in keep}, step)
        out = {"virtual_step": self.virtual_step}
        if step % self.m == 0:
            self.job.tracker.end_phase(self.phase_run)
            self.phase_run = None
            # No projection after the job's last real step: nothing would re-ground it (cycle 1 + m of the paper).
            if step != self.job.cfg.trainer.total_steps:
                out.update(self.extrapolate(step))
                out["virtual_step"] = self.virtual_step
        return out

    def extrapolate(self, step: int) -> dict:
        import ray

        job, s = self.job, self.job.cfg.schedule
        run = job.tracker.start_phase(
            f"extrapolation-{self.cycle}",
            "extrapolation_phase",
            {
                "cycle": self.cycle,
                "beta_mode": s.beta_mode,
                "m": self.m,
                "n": s.n,
                "rl_step": step,
                "selection": s.selection,
                "velocity": s.velocity,
                "anchor": s.anchor,
                "tensors_eligible": len(self.selected),
            },
        )
        eval_before = job.evaluate() if s.eval_around_projection else None
        rec, groups = ray.get(self.actor.extrapolate.remote(self.cycle, job.groups))
        job.groups.weight_version = groups.weight_version
        job.groups.rollouts = groups.rollouts  # a rollout engine the extrapolator had to restart
        job.groups.rollout_restarts = getattr(groups, "rollout_restarts", 0)
        self.counters[f"projections_{rec.outcome}"] += 1
        span = rec.steps_in_cycle if self.xcfg.anchor == "cycle_start" else 1
        if rec.outcome == "made":
            self.virtual_step += round((rec.beta - 1.0) * span)
        eval_after = job.evaluate() if s.eval_around_projection and rec.outcome == "made" else eval_before
        result = {
            "extra/beta": rec.beta,
            "extra/beta_max": rec.beta_max,
            "extra/made": float(rec.outcome == "made"),
            "extra/rolled_back": float(rec.outcome == "rolled_back"),
            "extra/skipped": float(rec.outcome == "skipped"),
            "extra/drift_share": rec.drift_share,
            "extra/r2_median": rec.r2_median,
            "extra/r2_frac_above_0_7": rec.r2_frac_above_0_7,
            "extra/displacement_norm": rec.displacement_norm,
            "extra/selected_frac": rec.selected_frac,
            "extra/selected_tensors": rec.selected_tensors,
            "extra/projected_frac": rec.projected_frac,
            "extra/time_s": rec.time_s,
            "extra/val_reward_before": rec.val_reward_before,
            "extra/val_reward_after": rec.val_reward_after,
        }
        if eval_before is not None:
            result["extra/eval_acc_before"] = eval_before["eval/avg_at_k"]
            result["extra/eval_acc_after"] = eval_after["eval/avg_at_k"]
        result = {k: v for k, v in result.items() if v is None or not (isinstance(v, float) and math.isnan(v))}
        job.tracker.log_phase_metrics(run, {**result, "virtual_step": self.virtual_step}, step)
        record = {k: v for k, v in vars(rec).items() if k != "drift_share_per_tensor"}
        record.update(rl_step=step, virtual_step=self.virtual_step, eval_before=eval_before, eval_after=eval_after)
        self.records.append(record)
        job.tracker.log_json(
            {**record, "drift_share_per_tensor": rec.drift_share_per_tensor},
            f"rl_extra/extrapolation-{self.cycle}.json",
        )
        job.tracker.end_phase(run)
        what = {"made": f"projected with beta={rec.beta:.3g}", "skipped": "skipped", "rolled_back": "rolled back"}[
            rec.outcome
        ]
        job.log(
            f"cycle {self.cycle} (rl_step {step}): {what}; drift share {rec.drift_share:.3f}, "
            f"R² median {rec.r2_median:.3f}, selected {rec.selected_frac:.1%}"
            + (f" — {'; '.join(rec.reasons)}" if rec.reasons else "")
        )
        return result

    # ---------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        import ray

        return {
            "cycle": self.cycle,
            "virtual_step": self.virtual_step,
            "counters": dict(self.counters),
            "phase_run": self.phase_run,
            "policy": ray.get(self.actor.state.remote()),
            "records": self.records,
        }

    def load_state(self, state: dict) -> None:
        import ray

        self.cycle, self.virtual_step = int(state["cycle"]), int(state["virtual_step"])
        self.counters.update(state["counters"])
        self.phase_run = state.get("phase_run")
        self.records = list(state.get("records", []))
        ray.get(self.actor.load_state.remote(state["policy"]))
        if self.phase_run:
            self.job.tracker.reopen_phase(self.phase_run)

    def finish(self) -> None:
        """The job's last steps may form a partial cycle: close its RL phase run."""
        if self.phase_run:
            self.job.tracker.end_phase(self.phase_run)
            self.phase_run = None

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        finally:
            ray.kill(self.actor)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _from_jsonable(x):
    return tuple(_from_jsonable(v) for v in x) if isinstance(x, list) else x


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def print_summary(summary: dict) -> None:
    rows = [
        ("real RL steps", summary["rl_steps"]),
        ("virtual steps", f"{summary['virtual_steps']} ({summary['schedule']})"),
        (
            f"eval Avg@{summary['eval_k']} before → after",
            f"{summary['eval_accuracy_before']:.3f} → {summary['eval_accuracy_after']:.3f}",
        ),
        (
            "eval greedy accuracy before → after",
            f"{summary['eval_greedy_accuracy_before']:.3f} → {summary['eval_greedy_accuracy_after']:.3f}",
        ),
        (
            f"eval Pass@{summary['eval_k']} before → after",
            f"{summary['eval_pass_at_k_before']:.3f} → {summary['eval_pass_at_k_after']:.3f}",
        ),
        ("wall time (s)", f"{summary['wall_time_s']:.1f} (+{summary['setup_time_s']:.1f} set-up)"),
        ("mean step time (s)", f"{summary['mean_step_time_s']:.2f}"),
        ("MLflow run", f"{summary['mlflow_run_id']} ({summary['mlflow_tracking_uri']})"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40), flush=True)


def run_to_completion(task) -> dict:
    """setup() → run() → close(status): the MLflow run ends FINISHED only when run() returned."""
    status = "FAILED"
    try:
        task.setup()
        summary = task.run()
        status = "FINISHED"
        return summary
    finally:
        task.close(status)


def run_job(cfg: DictConfig, output_dir: str) -> dict:
    return run_to_completion(Job(cfg, output_dir))


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
