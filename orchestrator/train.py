"""The main job: RLVR training of a causal LM with vLLM rollout actors and DeepSpeed learner actors on Ray.

    python -m orchestrator.train                       # embedded defaults: tiny model, toy task, local Ray
    python -m orchestrator.train learner.lr=6e-5 trainer.total_steps=200
    python -m orchestrator.train model=hf data=files data.train_files=... cluster=existing

One RL step: prompts → rollouts (vLLM, behaviour log-probs at the sampling temperature) → rewards (verifiers,
scored in parallel worker processes) → advantages (GRPO by default) → optimizer step(s) on the learner group
(DeepSpeed ZeRO, micro-batched; one a batch unless trainer.updates_per_batch says more) → weight sync to every
rollout engine (bucketed, versioned) → metrics.
RL-Extra (orchestrator/rl_extra.py) is on by default with the `lookahead` strategy (conf/schedule/lookahead.yaml:
SFPO's fast steps and reposition inside every step); `schedule=rl_extra` ends every m-th step with the paper's
extrapolation phase.

Choices:
- One optimizer step per rollout batch by default (`trainer.updates_per_batch` passes over it, as TRL's
  num_iterations / verl's ppo_epochs: a tuned GRPO may want several), and the behaviour log-probs from vLLM are the
  PPO `old_logp` of every pass (the learner recomputes the current ones at the same temperature). Strictly
  on-policy by default; `trainer.off_policy_steps=1` generates batch t+1 while batch t trains (one step stale;
  drained before an RL-Extra projection; a checkpoint keeps the batch in flight, so resume and learner recovery
  train on the same batch).
- Evaluation on the held-out split reports greedy accuracy and Avg@k / Pass@k (k samples at the training
  temperature): on the toy task greedy picks the majority procedure, so Avg@k is the smooth signal.
- Everything is seeded; prompts are drawn by a checkpointable cursor; the learning rate advances by real step.
- Checkpoints hold model + optimizer per rank, RL-Extra's per-rank state, and `rlextra_state.json` (step counters,
  data position, schedule position, RNG, MLflow run), written last into a staging folder renamed into place:
  `trainer.resume=auto` continues from the newest usable one in the same MLflow run (a torn one is set aside and
  named); a dead learner rank restarts the learner group from it.
- Bad inputs (model folder, data rows, the checkpoint to resume from) are found in `setup()` before MLflow or Ray
  start (orchestrator/models.py, orchestrator/data.py, orchestrator/checkpoints.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from actors.groups import ActorGroups
from orchestrator.batches import ScoredRollout, mean, shard_batch, step_metrics
from orchestrator.checkpoints import (
    HF_DIR,
    IN_FLIGHT_FILE,
    checkpoint_root,
    checkpoint_tag,
    complete_checkpoints,
    newest_usable_checkpoint,
    publish_checkpoint,
    staging_dir,
    write_state,
)
from orchestrator.cli import hydra_cli
from orchestrator.config import JobConfig, validate
from orchestrator.console import console
from orchestrator.messages import RolloutResult, SamplingConfig, TrainBatch, ValidationBatch
from orchestrator.metrics import sample_metrics
from orchestrator.rl_extra import RLExtraSchedule
from orchestrator.tracking import Tracker


class Job:
    """Holds the job's components; `run()` executes the loop. Separate from Hydra so tests can drive it.

    The config is checked when the job is made, its inputs (model, data, the checkpoint to resume from) first thing
    in `setup()`: nothing is written or started on a config or input that cannot work."""

    def __init__(self, cfg: DictConfig | JobConfig, output_dir: str):
        self.cfg: JobConfig = validate(cfg)
        self.output_dir = output_dir
        self.log = console
        # set up by setup()
        self.model_path: str | None = None
        self.train_ds = self.eval_ds = None
        self.tokenizer = None
        self.pad_id: int | None = None
        self.encode = None  # prompt text -> token ids (orchestrator.data.PromptEncoder)
        self.cursor = None  # orchestrator.data.PromptCursor over the train split
        self.eval_prompt_ids: list[list[int]] = []
        self.eval_answers: list[str] = []
        self.scorer = None  # verifiers.pool.ScoringPool
        self.resume: tuple[str, dict] | None = None  # (checkpoint tag, its rlextra_state.json) to continue from
        self.torn_checkpoints: list[tuple[str, str]] = []  # (set-aside name, why) found before the MLflow run
        self.tracker: Tracker | None = None
        self.ray_started = False
        self.groups: ActorGroups | None = None
        self.setup_time_s = 0.0
        # set up by run()
        self.extra: RLExtraSchedule | None = None
        self.in_flight: ScoredRollout | None = None  # off_policy_steps=1: the next step's batch, generated early
        self.eval_before: dict | None = None
        self.step_times: list[float] = []
        self.learner_restarts = 0

    # ----------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        from actors.learner import LearnerSpec
        from actors.rollout import RolloutSpec
        from orchestrator.cluster import init_ray, start_actor_groups
        from orchestrator.data import PromptCursor, PromptEncoder, load_splits, resolve_model
        from orchestrator.models import load_tokenizer
        from verifiers.pool import ScoringPool

        cfg = self.cfg
        hf_logging.disable_progress_bar()  # the job has its own progress bar
        t0 = time.perf_counter()
        # The inputs, checked before anything starts: the model folder, its tokenizer, every data row (prompt
        # lengths and reference answers too), and the checkpoint to resume from.
        self.model_path = resolve_model(cfg, log=self.log)
        self.tokenizer = tok = load_tokenizer(self.model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encode = PromptEncoder(tok, cfg.data.apply_chat_template, cfg.data.max_prompt_tokens)
        data = load_splits(cfg, self.encode, log=self.log)
        self.train_ds, self.eval_ds = data.train, data.eval
        self.cursor = PromptCursor(size=len(self.train_ds), seed=cfg.seed)
        n_eval = min(cfg.trainer.eval_prompts, len(self.eval_ds))
        self.eval_prompt_ids = [self.encode(self.eval_ds[i]["prompt"]) for i in range(n_eval)]
        self.eval_answers = [self.eval_ds[i]["answer"] for i in range(n_eval)]
        self.resume = self.newest_checkpoint() if cfg.trainer.resume == "auto" else None
        self.scorer = ScoringPool(max_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s)
        if self.resume:  # the same MLflow run continues; steps it already holds are not logged twice
            self.tracker = Tracker(cfg, resume_run_id=self.resume[1]["mlflow_run_id"])
        else:
            self.tracker = Tracker(cfg)
            self.tracker.log_config(cfg)
        self.tracker.log_metrics(data.skipped, step=0)
        self.log_torn_checkpoints()
        self.ray_started = init_ray(cfg.cluster)
        learner = LearnerSpec.for_job(cfg, self.model_path)
        rollouts = [RolloutSpec(self.model_path, cfg.rollout, cfg.seed + i) for i in range(cfg.rollout.num_actors)]
        self.groups = start_actor_groups(cfg, learner, rollouts)
        self.warn_if_engines_run_in_waves()
        self.setup_time_s = time.perf_counter() - t0
        self.log(
            f"set-up done in {self.setup_time_s:.1f} s: model {self.model_path}, "
            f"{len(self.train_ds)} train / {n_eval} eval prompts, "
            f"MLflow run {self.tracker.run_id} at {self.tracker.uri}"
        )

    def warn_if_engines_run_in_waves(self) -> None:
        """One line when an engine's KV cache cannot hold the largest batch it is handed (an RL step's or an eval's
        sampled responses, split across the engines): the job would run, slowly."""
        import ray

        from orchestrator.cluster import kv_cache_warning

        cfg, tr = self.cfg, self.cfg.trainer
        batch = max(cfg.batch_size, len(self.eval_prompt_ids) * tr.eval_samples)
        held = min(ray.get([r.kv_capacity.remote() for r in self.groups.rollouts]))
        warning = kv_cache_warning(cfg.rollout, held, -(-batch // cfg.rollout.num_actors))
        if warning:
            self.log(warning)

    def start_schedule(self) -> RLExtraSchedule | None:
        """The RL-Extra schedule (schedule=rl_extra), with its extrapolator actor; None for plain RL."""
        cfg, s = self.cfg, self.cfg.schedule
        if s.name != "rl_extra":
            return None
        return RLExtraSchedule(
            s,
            total_steps=cfg.trainer.total_steps,
            groups=self.groups,
            tracker=self.tracker,
            validation=self.validation_batch() if s.needs_validation else None,
            verifier=cfg.data.verifier,
            reward_timeout_s=cfg.reward.timeout_s,
            evaluate=self.evaluate,
            log=self.log,
        )

    def validation_batch(self) -> ValidationBatch:
        """A fixed slice of the train split (never the held-out eval split) to score candidate projections."""
        s, ds = self.cfg.schedule, self.train_ds
        idx = random.Random(f"validation-{self.cfg.seed}").sample(range(len(ds)), min(s.validation_prompts, len(ds)))
        rows = ds.select(idx)
        return ValidationBatch(
            [self.encode(p) for p in rows["prompt"]],
            list(rows["answer"]),
            self.sampling(s.validation_samples, seed=self.cfg.seed + 777),
            self.pad_id,
        )

    # ------------------------------------------------------------------------------------------ pieces

    def sampling(self, n: int, greedy: bool = False, seed: int | None = None) -> SamplingConfig:
        rc = self.cfg.rollout
        return SamplingConfig(
            n=n,
            temperature=0.0 if greedy else rc.temperature,
            top_p=rc.top_p,
            max_tokens=rc.max_tokens,
            seed=seed,
            min_tokens=rc.min_tokens,
        )

    def evaluate(self) -> dict:
        k, verifier = self.cfg.trainer.eval_samples, self.cfg.data.verifier
        greedy = self.groups.generate(self.eval_prompt_ids, self.sampling(1, greedy=True))
        g_scores = self.scorer.score_batch(verifier, greedy.response_text, self.eval_answers)
        sampled = self.groups.generate(self.eval_prompt_ids, self.sampling(k, seed=self.cfg.seed + 12345))
        refs = [self.eval_answers[i] for i in sampled.prompt_index]
        s_scores = self.scorer.score_batch(verifier, sampled.response_text, refs)
        sampled_metrics = sample_metrics(s_scores, k)
        return {
            "eval/greedy_accuracy": sum(g_scores) / len(g_scores),
            "eval/avg_at_k": sampled_metrics["avg_at_k"],
            "eval/pass_at_k": sampled_metrics["pass_at_k"],
            "eval/response_length": sum(len(r) for r in sampled.response_ids) / len(sampled.response_ids),
        }

    def next_prompts(self, step: int) -> tuple[list[list[int]], list[str], SamplingConfig]:
        """RL step `step`'s prompts (the cursor's next ones) as token ids, their answers, and its sampling (seeded by
        the step, so a batch is the same whenever it is generated)."""
        cfg, tr = self.cfg, self.cfg.trainer
        rows = self.train_ds[self.cursor.next(tr.prompts_per_step)]  # {column: values}: no indices mapping to build
        sampling = self.sampling(tr.samples_per_prompt, seed=cfg.seed * 100003 + step)
        return [self.encode(p) for p in rows["prompt"]], list(rows["answer"]), sampling

    def score(self, step: int, result: RolloutResult, answers: list[str], rollout_s: float) -> ScoredRollout:
        t = time.perf_counter()
        refs = [answers[i] for i in result.prompt_index]
        rewards = self.scorer.score_batch(self.cfg.data.verifier, result.response_text, refs)
        return ScoredRollout(step, result, rewards, rollout_s, time.perf_counter() - t)

    def rollout(self, step: int) -> ScoredRollout:
        """Generate and score RL step `step`'s batch now, on the weights the engines hold (a dead engine is
        restarted and its share generated again)."""
        t = time.perf_counter()
        prompt_ids, answers, sampling = self.next_prompts(step)
        result = self.groups.generate(prompt_ids, sampling)
        return self.score(step, result, answers, time.perf_counter() - t)

    def prefetches(self, step: int) -> bool:
        """Is step+1's batch generated while step `step` learns? With trainer.off_policy_steps=1, unless this is the
        last step or an RL-Extra projection follows it: the batch after a projection is sampled from the projected
        weights, never from the ones the projection replaced."""
        if not self.cfg.trainer.off_policy_steps or step >= self.cfg.trainer.total_steps:
            return False
        return not (self.extra and self.extra.projects_after(step))

    def rollout_and_learn(self, step: int) -> dict:
        """One real RL step: its batch (generated now, or in flight since the previous step), advantages, the
        learners' passes over it (trainer.updates_per_batch optimizer steps; meanwhile, with off_policy_steps=1, the
        engines generate the next batch), sync; returns its metrics. The driver's waits are timed: time/step_s is
        their sum, the step's wall time."""
        import torch

        from orchestrator.algorithms import get_advantage_fn

        cfg = self.cfg
        if self.in_flight is None:
            batch = self.rollout(step)
            produced = [batch]  # the batches this step waited for
        else:
            batch, produced, self.in_flight = self.in_flight, [], None
        if batch.step != step:
            raise RuntimeError(f"RL step {step} was handed the batch of step {batch.step}")
        pending = None
        if self.prefetches(step):
            next_prompts, next_answers, next_sampling = self.next_prompts(step + 1)
            pending = self.groups.submit_generate(next_prompts, next_sampling)

        times = {}
        t = time.perf_counter()
        result, rewards = batch.result, batch.rewards
        train = TrainBatch.from_rollout(result, torch.zeros(len(rewards)), self.pad_id, cfg.rollout.temperature)
        train.advantages = get_advantage_fn(cfg.algo.advantage)(
            torch.tensor(rewards, dtype=torch.float32),
            torch.tensor(result.prompt_index, dtype=torch.long),
            train.response_mask,
            eps=cfg.algo.eps,
            gamma=cfg.algo.gamma,
        ).float()
        learner_version = self.groups.weight_version
        shards = shard_batch(train, cfg.learner.world_size)
        updates = cfg.trainer.updates_per_batch
        per_rank = self.extra.train(shards, updates) if self.extra else self.groups.train_step(shards, updates=updates)
        times["time/learn_s"] = time.perf_counter() - t

        if pending is not None:
            self.in_flight = self.collect(step + 1, pending, next_answers)
            produced += [self.in_flight] if self.in_flight else []
        times["time/rollout_s"] = sum(b.rollout_s for b in produced)
        times["time/reward_s"] = sum(b.reward_s for b in produced)

        t = time.perf_counter()
        sync = self.groups.sync_weights(cfg.rollout.bucket_mb)
        times["time/sync_s"] = time.perf_counter() - t

        n_tokens = int(train.response_mask.sum())
        return {
            **step_metrics(result, rewards, per_rank, n_tokens, with_kl_ref=cfg.algo.kl_coef > 0),
            "train/staleness": learner_version - result.weight_version,
            "perf/tokens_per_s": n_tokens / max(result.gen_time_s, 1e-9),
            "perf/weight_version": sync["version"],
            "perf/behaviour_version": result.weight_version,
            "cluster/rollout_restarts": self.groups.rollout_restarts,
            "time/step_s": sum(times.values()),
            **times,
        }

    def collect(self, step: int, pending, answers: list[str]) -> ScoredRollout | None:
        """Wait for the batch generated in flight for RL step `step` and score it. An engine that died meanwhile
        loses the batch: its prompts go back to the cursor and it is generated again, on-policy, once the sync has
        restarted the engine."""
        from ray.exceptions import RayActorError

        t = time.perf_counter()
        try:
            result = pending.result()
        except RayActorError as exc:
            self.cursor.position -= self.cfg.trainer.prompts_per_step
            self.log(
                f"a rollout engine died with RL step {step}'s batch in flight ({type(exc).__name__}); "
                "it is generated again after the sync"
            )
            return None
        return self.score(step, result, answers, time.perf_counter() - t)

    def step(self, step: int) -> dict:
        """One real RL step with its RL-Extra bookkeeping (anchor before, extrapolation phase after)."""
        if self.extra:
            self.extra.before_step(step)
        m = self.rollout_and_learn(step)
        m["rl_step"] = step
        if self.extra:
            m.update(self.extra.after_step(step, m))
        else:
            m["virtual_step"] = step
        return m

    # ------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, step: int) -> str:
        """Model + optimizer + LR schedule per rank (DeepSpeed), RL-Extra anchors and statistics per rank, and
        `rlextra_state.json` (step counters, data position, schedule position, RNG, MLflow run, world size), written
        last into the staging folder, which is then renamed into place."""
        ckpt_root = checkpoint_root(self.output_dir)
        tag = checkpoint_tag(step)
        staging = staging_dir(ckpt_root, tag)  # renamed into place once whole: a torn save is never listed
        state = {
            "rl_step": step,
            "data_position": self.cursor.position,
            "weight_version": self.groups.weight_version,
            "mlflow_run_id": self.tracker.run_id,
            "eval_before": self.eval_before,
            "step_times": self.step_times,
            "schedule": self.extra.state() if self.extra else None,
            "python_rng": _jsonable(random.getstate()),
            "world_size": self.cfg.learner.world_size,  # DeepSpeed's shards resume only on as many ranks
        }
        self.groups.call_learners("save_checkpoint", ckpt_root, os.path.basename(staging), {"rl_step": step})
        if self.in_flight is not None:  # generated by the weights before this checkpoint's: kept, not regenerated
            with open(os.path.join(staging, IN_FLIGHT_FILE), "w") as f:
                f.write(self.in_flight.to_json())
        write_state(staging, state)
        final = publish_checkpoint(ckpt_root, tag)
        keep = self.cfg.trainer.keep_checkpoints
        if keep:
            for old in complete_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
        return os.path.join(final, HF_DIR)

    def newest_checkpoint(self) -> tuple[str, dict] | None:
        """(tag, rlextra_state.json) of the newest usable checkpoint under output_dir/checkpoints, or None. A newer
        torn one is set aside and named on the console, and in MLflow once the run exists."""
        tag, state, torn = newest_usable_checkpoint(checkpoint_root(self.output_dir), self.cfg.learner.world_size)
        for _, line in torn:
            self.log(line)
        self.torn_checkpoints += torn
        self.log_torn_checkpoints()
        return (tag, state) if tag else None

    def log_torn_checkpoints(self) -> None:
        """The torn checkpoints found so far, as artifacts `torn_checkpoints/<set-aside name>.txt` of the run."""
        if self.tracker is None:
            return
        for aside, line in self.torn_checkpoints:
            self.tracker.log_text(line + "\n", f"torn_checkpoints/{aside}.txt")
        self.torn_checkpoints = []

    def restore(self, tag: str, state: dict) -> int:
        """Load a checkpoint into the live job; returns the next RL step."""
        root = checkpoint_root(self.output_dir)
        self.groups.call_learners("load_checkpoint", root, tag)
        self.cursor.position = int(state["data_position"])  # past the batch in flight, if one was saved
        in_flight = os.path.join(root, tag, IN_FLIGHT_FILE)
        self.in_flight = ScoredRollout.from_json(Path(in_flight).read_text()) if os.path.exists(in_flight) else None
        self.groups.weight_version = int(state["weight_version"])
        self.groups.sync_weights(self.cfg.rollout.bucket_mb)  # the engines still hold the initial weights
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
        options = {
            "weight_fraction": a.weight_fraction,
            "num_probes": a.num_probes,
            "samples_per_probe": a.samples_per_probe,
            "plots": a.plots,
        }
        prompts = [self.eval_ds[i]["prompt"] for i in range(min(a.num_probes, len(self.eval_ds)))]
        result = analyze_run(
            found,
            os.path.join(self.output_dir, "linearity"),
            options,
            prompts=prompts,
            chat_template=self.cfg.data.apply_chat_template,
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
        limit = self.cfg.trainer.max_learner_restarts
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
        found = self.newest_checkpoint()
        if found:
            return self.restore(*found)
        self.log("no checkpoint yet: starting again from the initial weights")
        self.cursor.position = 0
        self.in_flight = None
        self.step_times = []
        self.groups.sync_weights(self.cfg.rollout.bucket_mb)
        if self.extra:
            self.extra.reset_state()
        return 1

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        from tqdm import tqdm

        cfg, tr = self.cfg, self.cfg.trainer
        start = time.perf_counter()
        self.extra = self.start_schedule()
        self.step_times = []
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
                m = self.step(step)
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
        linearity = self.analyze_own_checkpoints() if cfg.analysis.enabled else None
        return self.write_summary(before, after, first_step, final_ckpt, linearity, time.perf_counter() - start)

    def write_summary(self, before: dict, after: dict, first_step: int, final_ckpt, linearity, wall: float) -> dict:
        """summary.json in output_dir (also an MLflow artifact) and the table on stdout."""
        cfg, tr = self.cfg, self.cfg.trainer
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
            "rollout_restarts": self.groups.rollout_restarts,
            "wall_time_s": wall,
            "setup_time_s": self.setup_time_s,
            "mean_step_time_s": mean(self.step_times) if self.step_times else 0.0,
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
            lambda: self.extra.close() if self.extra else None,
            lambda: self.groups.shutdown() if self.groups else None,
            lambda: self.scorer.close() if self.scorer else None,
            lambda: self.tracker.finish(status) if self.tracker else None,
            lambda: ray.shutdown() if self.ray_started else None,
        ):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                self.log(f"warning: shutdown step failed: {exc}")


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _from_jsonable(x):
    return tuple(_from_jsonable(v) for v in x) if isinstance(x, list) else x


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


def run_job(cfg: DictConfig | JobConfig, output_dir: str) -> dict:
    return run_to_completion(Job(cfg, output_dir))


@hydra_cli("config", JobConfig)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    job = Job(cfg, "")  # checks the config before anything is written
    job.output_dir = job.cfg.trainer.output_dir or HydraConfig.get().runtime.output_dir
    run_to_completion(job)  # output_dir is made by what first writes there, after set-up's checks


if __name__ == "__main__":
    main()
