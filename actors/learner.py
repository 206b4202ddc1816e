"""LearnerActor: one DeepSpeed ZeRO rank of the policy.

A learner group is `world_size` of these actors, each a rank of one torch.distributed group (gloo on CPU,
nccl on GPU). The controller gives every rank an equal shard of the step's batch; `train_step` recomputes
the log-probs under the current weights, applies the registered policy loss with micro-batching and
gradient accumulation (DeepSpeed steps the optimizer at the accumulation boundary), and returns metrics.

Weight sync (actors/weight_sync.py): every rank gathers full weights module by module (ZeRO-3 gathers are
collectives, so memory stays bounded); rank 0 either returns them in buckets of about `bucket_mb` for the object
store (`export_weights`) or broadcasts them to the rollout engines over its weight group (`broadcast_weights`).

The class is plain Python so it can be used without Ray (tests, benchmarks); `orchestrator.cluster` wraps it
with `ray.remote`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from dataclasses import dataclass

from actors.weight_sync import WeightGroup, bucket_by_layer, host_store, layer_key, plan_buckets, to_transport
from orchestrator.checkpoints import HF_DIR
from orchestrator.config import AlgoConfig, JobConfig, LearnerConfig
from orchestrator.messages import TrainBatch, TrainMetrics


@dataclass(frozen=True)
class LearnerSpec:
    """What one learner rank is built from (crosses the Ray boundary): the learner and algorithm settings as
    configured, the model to load, this rank's share of every step's batch, and the seed."""

    model_path: str
    learner: LearnerConfig
    algo: AlgoConfig
    samples_per_rank: int  # rank-local batch per optimizer step; a multiple of learner.micro_batch_size
    seed: int

    @classmethod
    def for_job(cls, job: JobConfig, model_path: str) -> LearnerSpec:
        return cls(model_path, job.learner, job.algo, job.batch_size // job.learner.world_size, job.seed)

    @property
    def grad_accum_steps(self) -> int:
        return max(1, self.samples_per_rank // self.learner.micro_batch_size)


def _device_and_backend(spec: LearnerSpec):
    import torch

    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    backend = spec.learner.backend if spec.learner.backend != "auto" else ("nccl" if use_cuda else "gloo")
    return ("cuda" if use_cuda else "cpu"), backend


def ds_config(spec: LearnerSpec) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": spec.learner.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "train_batch_size": spec.learner.micro_batch_size * spec.grad_accum_steps * spec.learner.world_size,
        "gradient_clipping": spec.learner.grad_clip,
        "zero_optimization": {"stage": spec.learner.zero_stage},
        "bf16": {"enabled": spec.learner.dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": spec.learner.lr,
                "betas": list(spec.learner.betas),
                "weight_decay": spec.learner.weight_decay,
                "eps": 1e-8,
                "torch_adam": True,  # the fused CPU Adam op needs a JIT build; torch's is fine here
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.learner.dtype == "bf16":
        # Keep fp32 gradient accumulation: the fp32 master weights are what RL-Extra projects.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def response_logits_to_logp(logits, responses, temperature: float):
    """Per-token log-probs and entropies of the responses under logits / T.

    logits: float[B, R, V] (already aligned: position j predicts responses[:, j]); responses: long[B, R].
    Returns (logp float[B, R], entropy float[B, R]).
    """
    import torch

    logits = logits.float() / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def forward_response_logits(model, batch: TrainBatch):
    """Run the model on prompt+response and return logits aligned with the response tokens, float[B, R, V]."""
    import torch

    input_ids = torch.cat([batch.prompts, batch.responses], dim=1)
    attn = batch.attention_mask
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False)
    p = batch.prompts.shape[1]
    return out.logits[:, p - 1 : -1]


def torch_no_grad_method(fn):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


class LearnerActor:
    """One rank. Call `setup()` on every rank at once (it joins the process group)."""

    def __init__(self, spec: LearnerSpec, rank: int, master_addr: str, master_port: int):
        if not spec.learner.num_gpus:  # DeepSpeed picks its accelerator at import; a GPU rank keeps CUDA
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.spec = spec
        self.rank = rank
        os.environ.update(
            {
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "WORLD_SIZE": str(spec.learner.world_size),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
            }
        )
        self.engine = None
        self.optimizer = None
        self.reference = None
        self.projector = None  # RL-Extra's ShardProjector, once extra_setup ran
        self.steps_done = 0
        self.weight_group = None  # rank 0, collective sync: actors/weight_sync.py WeightGroup
        self._weight_store = None  # (store, world size, timeout) of the group being built

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self) -> dict:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        spec = self.spec
        if spec.learner.num_threads > 0:
            torch.set_num_threads(spec.learner.num_threads)
        device, backend = _device_and_backend(spec)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if device == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (~30 s cold, and a build
            # killed midway leaves a lock that hangs every later start). gloo does the job without it.
            import sys

            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        torch.manual_seed(spec.seed)
        dtype = torch.bfloat16 if spec.learner.dtype == "bf16" else torch.float32
        config = ds_config(spec)
        if spec.learner.zero_stage == 3:
            # transformers partitions at construction (zero.Init) and loads shard by shard when this object
            # is alive during from_pretrained: no rank ever materialises the full model.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(config)
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
        model.config.use_cache = False
        if spec.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        warmup = max(0, spec.learner.warmup_steps)

        def lr_lambda(step: int) -> float:
            return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        )
        self.engine.train()
        self.device = device
        self.reference = self._build_reference(config, dtype) if spec.algo.kl_coef > 0 else None
        return {"rank": self.rank, "device": device, "backend": backend, "pid": os.getpid()}

    def _build_reference(self, config: dict, dtype):
        """The frozen initial policy for the KL term, partitioned like the policy under ZeRO-3."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(self.spec.model_path, dtype=dtype)
        ref.eval().requires_grad_(False)
        if self.spec.learner.zero_stage == 3:
            ref_config = {k: v for k, v in config.items() if k not in ("optimizer", "gradient_clipping")}
            ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_config)
            ref_engine.eval()
            return ref_engine
        return ref.to(self.engine.device)

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch, fast: bool = False, updates: int = 1) -> TrainMetrics:
        """`updates` optimizer steps over this rank's shard, each a full pass (micro-batched, gradients accumulated);
        returns the last pass's metrics.

        updates > 1 (trainer.updates_per_batch: TRL's num_iterations, verl's ppo_epochs with one mini-batch): every
        pass's ratio is taken against the batch's behaviour log-probs, so the clip bounds the whole move from the
        sampling policy; the LR schedule advances once, after the last pass, and a projector observes the last pass
        only — warm-up and RL-Extra cycles count RL steps, not passes.
        fast: a lookahead (SFPO) fast step on a batch that gets more steps — the LR schedule does not advance (SFPO
        steps its scheduler once per RL step: the fast steps run at the step's learning rate)."""
        for _ in range(updates - 1):
            with _frozen_lr_schedule(self.engine):
                self._train_step(batch, observe=False)
        with _frozen_lr_schedule(self.engine) if fast else contextlib.nullcontext():
            return self._train_step(batch)

    def _train_step(self, batch: TrainBatch, observe: bool = True) -> TrainMetrics:
        import torch

        from orchestrator.algorithms import agg_loss, kl_penalty, policy_loss

        spec, engine = self.spec, self.engine
        n = len(batch)
        if n != spec.samples_per_rank:
            raise ValueError(f"learner rank {self.rank}: expected {spec.samples_per_rank} samples, got {n}")
        batch = _to_device(batch, engine.device)
        total_tokens = float(batch.response_mask.sum().clamp(min=1))
        token_weighted = spec.algo.loss_agg == "token-mean"
        sums = {"loss": 0.0, "clip_frac": 0.0, "ppo_kl": 0.0, "entropy": 0.0, "kl_ref": 0.0}
        for start in range(0, n, spec.learner.micro_batch_size):
            micro = batch.slice(start, start + spec.learner.micro_batch_size)
            logits = forward_response_logits(engine, micro)
            logp, entropy = response_logits_to_logp(logits, micro.responses, micro.temperature)
            mask = micro.response_mask.to(logp.dtype)
            loss, metrics = policy_loss(
                spec.algo.loss,
                logp,
                micro.old_logp,
                micro.advantages,
                mask,
                clip_low=spec.algo.clip_low,
                clip_high=spec.algo.clip_high,
                clip_ratio_c=spec.algo.clip_ratio_c,
                agg=spec.algo.loss_agg,
            )
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp, _ = response_logits_to_logp(
                        forward_response_logits(self.reference, micro), micro.responses, micro.temperature
                    )
                kl = agg_loss(kl_penalty(logp, ref_logp, spec.algo.kl_kind), mask, spec.algo.loss_agg)
                loss = loss + spec.algo.kl_coef * kl
                metrics["kl_ref"] = float(kl.detach())
            # Weight each micro-batch so the accumulated loss equals the aggregate over the whole shard;
            # DeepSpeed divides by the accumulation steps, so multiply that back in.
            share = float(mask.sum()) / total_tokens if token_weighted else len(micro) / n
            engine.backward(loss * share * spec.grad_accum_steps)
            engine.step()
            tok_share = float(mask.sum()) / total_tokens
            sums["loss"] += float(loss.detach()) * share
            sums["clip_frac"] += float(metrics.get("clip_frac", 0.0)) * tok_share
            sums["ppo_kl"] += float(metrics.get("ppo_kl", 0.0)) * tok_share
            sums["kl_ref"] += float(metrics.get("kl_ref", 0.0)) * share
            with torch.no_grad():
                sums["entropy"] += float((entropy * mask).sum()) / total_tokens
        self.steps_done += 1
        if observe and self.projector is not None:
            self.projector.observe()
        grad_norm = engine.get_global_grad_norm()
        return TrainMetrics(
            loss=sums["loss"],
            clip_frac=sums["clip_frac"],
            ppo_kl=sums["ppo_kl"],
            entropy=sums["entropy"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=float(engine.get_lr()[0]),
            num_tokens=int(total_tokens),
            optimizer_steps=int(engine.global_steps),
            extra={"kl_ref": sums["kl_ref"]} if self.reference is not None else {},
        )

    @torch_no_grad_method
    def compute_logp(self, batch: TrainBatch):
        """Log-probs of the responses under the current weights, float[B, R] on CPU (for tests / eval)."""
        batch = _to_device(batch, self.engine.device)
        logits = forward_response_logits(self.engine, batch)
        logp, _ = response_logits_to_logp(logits, batch.responses, batch.temperature)
        return logp.cpu()

    # ------------------------------------------------------------------------------------ weight export

    def _parameter_groups(self):
        """Lists [(name, parameter)] per decoder layer (`layer_key`), in export order: each module's own parameters;
        a tied weight (embedding = output head) once, under its first name. ZeRO-3 gathers one list at a time: one
        coalesced all-gather per layer costs a fraction of one per module (bench/weight_sync.py), and memory stays
        bounded by the largest layer."""
        seen: set[int] = set()
        group: list = []
        for mod_name, mod in self.engine.module.named_modules():
            params = [
                (f"{mod_name}.{n}" if mod_name else n, p)
                for n, p in mod.named_parameters(recurse=False)
                if id(p) not in seen
            ]
            seen.update(id(p) for _, p in params)
            if group and params and layer_key(params[0][0]) != layer_key(group[0][0]):
                yield group
                group = []
            group += params
        if group:
            yield group

    def parameter_meta(self):
        """(name, meta tensor of the full shape and dtype) in export order; nothing is gathered."""
        import torch

        for params in self._parameter_groups():
            for name, p in params:
                yield name, torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device="meta")

    def full_parameters(self):
        """Yields (name, full tensor on the learner's device) for every parameter, gathering ZeRO-3 partitions
        module by module; a tensor is valid only until the next one is asked for (the gathered module is freed).

        Every rank must iterate (the gather is a collective); ranks other than 0 get None."""
        import deepspeed

        for params in self._parameter_groups():
            ctx = (
                deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
                if self.spec.learner.zero_stage == 3
                else contextlib.nullcontext()
            )
            with ctx:
                for name, p in params:
                    yield name, (p.detach() if self.rank == 0 else None)

    def named_full_parameters(self):
        """Like `full_parameters`, but the tensors stay valid: copies on CPU (views where they already are)."""
        for name, t in self.full_parameters():
            if t is None or (self.spec.learner.zero_stage != 3 and t.device.type == "cpu"):
                yield name, t
            else:
                yield name, t.to("cpu", copy=True)

    def export_weights(self, bucket_mb: float = 64.0):
        """Full weights for the object-store sync: rank 0 returns [[(name, array), ...], ...] buckets that end only
        at layer edges (vLLM processes a layer once all its tensors have arrived); other ranks return None."""
        named = ((n, t) for n, t in self.named_full_parameters() if t is not None)
        buckets = bucket_by_layer(named, bucket_mb)
        if self.rank != 0:
            return None
        # numpy arrays go into Ray's object store without pickling and are read back zero-copy.
        return [[(n, to_transport(t)) for n, t in bucket] for bucket in buckets]

    def fp32_master_weights(self) -> dict | None:
        """The optimizer's fp32 master weights (what each step updates and RL-Extra projects, in place on the shards),
        gathered whole: {name: float32 tensor} on rank 0, None on the others. A collective: call it on every rank.
        In bf16 runs the weights the model computes with are these, rounded."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"learner rank {self.rank}: no fp32 master for {name}")
            if self.rank == 0:
                out[name] = full.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    # ------------------------------------------------------------------------------------- weight group

    def open_weight_group(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host the rendezvous of a new weight group (this rank and every engine worker) on a port the OS
        picks; returns (this node's address, port). The previous group, if any, is dropped."""
        self.close_weight_group()
        self._weight_store = (host_store(world_size, timeout_s), world_size, timeout_s)
        return os.environ["MASTER_ADDR"], self._weight_store[0].port

    def join_weight_group(self) -> None:
        """Rank 0: join the group `open_weight_group` hosts as its rank 0; returns once every engine joined."""
        store, world_size, timeout_s = self._weight_store
        self._weight_store = None  # the group keeps the store alive
        self.weight_group = WeightGroup(store, 0, world_size, self.engine.device, timeout_s)

    def close_weight_group(self) -> None:
        if self.weight_group is not None:
            self.weight_group.abort()
        self.weight_group = None

    def broadcast_weights(self, version: int, bucket_mb: float) -> dict | None:
        """The collective sync: every rank gathers (ZeRO-3 collectives), rank 0 packs the buckets and broadcasts
        them to its weight group. Returns rank 0's timings (gather + pack, total), None elsewhere."""
        import time

        start = time.perf_counter()
        tensors = self.full_parameters()
        if self.rank != 0:
            for _ in tensors:
                pass
            return None
        try:
            if self.weight_group is None:
                raise RuntimeError("weight sync: learner rank 0 has no weight group (join_weight_group first)")
            stats = self.weight_group.send(version, plan_buckets(self.parameter_meta(), bucket_mb), tensors)
        except BaseException:
            for _ in tensors:  # the other ranks' gathers go on to the end: meet them there
                pass
            self.weight_group = None  # aborted by send()
            raise
        return stats | {"total_s": time.perf_counter() - start}

    # ---------------------------------------------------------------------------------------- RL-Extra

    def extra_setup(
        self,
        include=("*",),
        exclude=None,
        anchor_device: str | None = None,
        velocity: str = "two_point",
        monitor_samples: int = 2048,
        strategy: str = "extrapolate",
        half_steps: int = 0,
    ) -> dict:
        """Prepare in-place projection of this rank's fp32 master shard (see linearity/zero_shards.py).
        From now on every optimizer step also feeds the projector's statistics (`observe`)."""
        from linearity.zero_shards import ShardProjector

        self.projector = ShardProjector(
            self.engine,
            self.spec.learner.zero_stage,
            include,
            exclude,
            anchor_device,
            velocity=velocity,
            monitor_samples=monitor_samples,
            seed=self.spec.seed,
            strategy=strategy,
            half_steps=half_steps,
        )
        return {"selected": self.projector.selected_names, "skipped": self.projector.skipped_names}

    def extra_snapshot(self) -> None:
        self.projector.snapshot()

    def extra_end_cycle(
        self, selection: str = "names", threshold: float = 0.7, fraction: float = 0.1, rank1_iters: int = 8
    ):
        return self.projector.end_cycle(selection, float(threshold), float(fraction), int(rank1_iters))

    def extra_project(self, beta: float):
        return self.projector.project(float(beta))

    def extra_begin_phase(self) -> None:
        self.projector.begin_phase()

    def extra_rollback(self) -> None:
        self.projector.rollback()

    def extra_restore_anchor(self) -> None:
        self.projector.restore_anchor()

    def extra_reset_optimizer(self) -> int:
        return self.projector.reset_optimizer_state()

    # --------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str, tag: str, client_state: dict | None = None, hf: bool = True) -> str:
        """DeepSpeed checkpoint (model + optimizer, per rank) under `directory/tag`, and on rank 0 an HF
        export (weights + config + tokenizer) under `directory/tag/hf`."""
        import torch

        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state or {})
        if self.projector is not None:  # anchors, d_prev, trend sums: per rank, like the shards
            torch.save(self.projector.state_dict(), os.path.join(directory, tag, f"rl_extra_rank{self.rank}.pt"))
        hf_dir = os.path.join(directory, tag, HF_DIR)
        state = {}
        for name, tensor in self.named_full_parameters():
            if tensor is not None:
                state[name] = tensor
        if self.rank == 0 and hf:
            from transformers import AutoTokenizer

            model = self.engine.module
            os.makedirs(hf_dir, exist_ok=True)
            model.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
            try:
                AutoTokenizer.from_pretrained(self.spec.model_path).save_pretrained(hf_dir)
            except Exception:  # a model without a tokenizer is still a checkpoint
                pass
        return hf_dir

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        """Model, optimizer, LR schedule (DeepSpeed) and, when RL-Extra is set up, this rank's projector state."""
        import torch

        load_path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"checkpoint {os.path.join(directory, tag)}: DeepSpeed found nothing to load")
        extra = os.path.join(directory, tag, f"rl_extra_rank{self.rank}.pt")
        if self.projector is not None and os.path.exists(extra):
            self.projector.load_state_dict(torch.load(extra, weights_only=False))
        return client_state or {}

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        """Tear down cleanly: gloo threads can abort the process at exit otherwise (deepspeed-zero.md)."""
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.barrier()
        except Exception:
            pass
        self.close_weight_group()
        self.engine = None
        self.optimizer = None
        self.reference = None
        self.projector = None
        gc.collect()
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


@contextlib.contextmanager
def _frozen_lr_schedule(engine):
    """DeepSpeed steps its LR scheduler inside `engine.step()`; detached, the optimizer keeps the current rate."""
    scheduler, engine.lr_scheduler = engine.lr_scheduler, None
    try:
        yield
    finally:
        engine.lr_scheduler = scheduler


def _to_device(batch: TrainBatch, device) -> TrainBatch:
    if str(device) == "cpu":
        return batch
    return TrainBatch(
        prompts=batch.prompts.to(device),
        responses=batch.responses.to(device),
        attention_mask=batch.attention_mask.to(device),
        response_mask=batch.response_mask.to(device),
        old_logp=batch.old_logp.to(device),
        advantages=batch.advantages.to(device),
        temperature=batch.temperature,
    )
