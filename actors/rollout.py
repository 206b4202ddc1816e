"""RolloutActor: one vLLM engine that generates responses and takes weight updates from the learners.

Choices (measured in `shared/notes/vllm-cpu.md`):
- In-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by the actor's runtime env): ~3 s to start
  instead of ~30 s, and tensors handed to `collective_rpc` arrive by reference.
- Behaviour log-probs are vLLM's `processed_logprobs`, i.e. log_softmax(logits / T) (renormalised under
  top-p). The PPO ratio compares the learner's log-probs at the same temperature against these, so the
  loss sees the distribution the samples were actually drawn from.
- Weight updates go through a worker extension (`worker_extension_cls`, actors/vllm_weights.py) that writes each
  bucket straight into vLLM's parameters (re-packing CPU linear layers), else through the worker's layer-wise
  `reload_weights`. Buckets arrive either as this actor's argument (`update_weights`, object store) or over the
  engine's weight group (`join_weight_group` once, then `receive_weights` per sync; actors/weight_sync.py). The
  prefix cache is reset after each update: cached KV computed with old weights would otherwise be reused.
- On CPU the engine prefills whole prompts (no chunked prefill). vLLM rewinds a seeded request's generator when it
  discards the token sampled after a partial prefill; a CPU generator has no offset to rewind, so any batch whose
  prompts overflowed `max_num_batched_tokens` stopped the engine ("CPU Generator does not use offset").
- Responses come back as token ids (`detokenize=False`) and are decoded in one `batch_decode`: vLLM's per-token
  incremental detokenizer, and its decoding of every sampled token's log-prob entry, cost ~10 % of a toy rollout.
- Every result carries the weight version it was generated with.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

from orchestrator.config import RolloutConfig
from orchestrator.messages import RolloutResult, SamplingConfig

EXTENSION = "actors.vllm_weights.WeightSyncExtension"


KV_BLOCK_TOKENS = 128  # vLLM's KV block on CPU (16 on GPU): a sequence holds whole blocks
CPU_BATCHED_TOKENS = 4096  # vLLM's default tokens per engine step on CPU (its LLM class, one worker)


def kv_cache_bytes(model_path: str, rc: RolloutConfig) -> int:
    """KV cache room for `max_num_seqs` sequences of `max_model_len` tokens each, in whole blocks.

    Smaller and the engine admits only as many sequences as fit and runs a step's batch in waves: at 15M parameters
    the former fixed 64 MiB held 16 of 256 sequences (measured: generation ~1.4x slower than with 512 MiB)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    dtype = rc.dtype if rc.dtype != "auto" else str(getattr(c, "dtype", None) or "float32").removeprefix("torch.")
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)  # K and V
    blocks = -(-rc.max_model_len // KV_BLOCK_TOKENS)
    return rc.max_num_seqs * blocks * KV_BLOCK_TOKENS * per_token


@dataclass(frozen=True)
class RolloutSpec:
    """What one rollout engine is built from (crosses the Ray boundary): the engine settings as configured, the
    model to load, and the engine's sampling seed."""

    model_path: str
    rollout: RolloutConfig
    seed: int


SEED_SPACING = 4096  # prompt seeds are multiples of this: a prompt's n samples use seed + 0 .. n-1 (n <= this)


def cpu_batched_tokens(rc: RolloutConfig) -> int:
    """Tokens per engine step on CPU when the config leaves it to vLLM: its default, raised to what a step without
    chunked prefill needs (one whole prompt of up to max_model_len tokens; one token for each of max_num_seqs)."""
    return max(CPU_BATCHED_TOKENS, rc.max_model_len, rc.max_num_seqs)


def prompt_seed(seed: int, position: int) -> int:
    """The sampling seed of the prompt at `position` of a batch sampled with `seed`.

    vLLM seeds each request's generator with its own SamplingParams.seed, and the n samples of a request with
    seed + 0 .. n-1. One seed for a whole batch therefore gave every prompt the *same* random draws: samples were
    correlated across prompts (on toy_skills a whole sub-skill never drew its careful token: Avg@4 read 0.042
    where 0.125 was right) and across steps (step t's seed + 1 was step t+1's). A hash of (seed, position), spaced
    by SEED_SPACING, keeps every prompt's n streams apart from every other's and the batch reproducible."""
    digest = hashlib.sha256(f"{int(seed)}:{int(position)}".encode()).digest()
    return (int.from_bytes(digest[:6], "big") + 1) * SEED_SPACING


class RolloutActor:
    """Wraps one `vllm.LLM`. Plain class; `orchestrator.cluster` makes it a Ray actor."""

    def __init__(self, spec: RolloutSpec):
        # Must be set before vLLM is imported; the Ray runtime env sets them too.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
        from vllm import LLM

        self.spec = spec
        rc = spec.rollout
        kwargs = dict(
            model=spec.model_path,
            dtype=rc.dtype,
            max_model_len=rc.max_model_len,
            enforce_eager=rc.enforce_eager,
            max_num_seqs=rc.max_num_seqs,
            seed=spec.seed,
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=rc.tensor_parallel_size,
            enable_prefix_caching=True,
        )
        on_cpu = not rc.num_gpus  # as RolloutConfig.check reads it
        if rc.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = rc.max_num_batched_tokens
        if on_cpu:  # whole prompts per engine step (the module docstring says why)
            kwargs["enable_chunked_prefill"] = False
            kwargs.setdefault("max_num_batched_tokens", cpu_batched_tokens(rc))
        if rc.kv_cache_mb is None and on_cpu:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(spec.model_path, rc)
        elif rc.kv_cache_mb:
            kwargs["kv_cache_memory_bytes"] = rc.kv_cache_mb * 2**20
        else:
            kwargs["gpu_memory_utilization"] = rc.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = 0

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, positions: list[int] | None = None
    ) -> RolloutResult:
        """`sampling.n` samples for each prompt (token ids in, token ids + text + log-probs out). With a seed, each
        prompt samples from its own seed, `prompt_seed(sampling.seed, position)`, `positions` being the prompts'
        places in the whole batch (default 0, 1, ...; the actor group passes each engine's share)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0.0
        positions = list(range(len(prompt_ids))) if positions is None else list(positions)
        if len(positions) != len(prompt_ids) or sampling.n > SEED_SPACING:
            raise ValueError(f"{len(positions)} positions for {len(prompt_ids)} prompts, n={sampling.n}")

        def params(seed: int | None):
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                logprobs=0,
                seed=seed,
                detokenize=False,  # the texts are decoded below, in one batch
            )

        per_prompt = (
            params(None)
            if sampling.seed is None
            else [params(prompt_seed(sampling.seed, position)) for position in positions]
        )
        start = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], per_prompt, use_tqdm=False
        )
        elapsed = time.perf_counter() - start
        result = RolloutResult([], [], [], [], [], [], self.weight_version, elapsed)
        for i, out in enumerate(outputs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs or [])]
                result.prompt_index.append(i)
                result.prompt_ids.append(list(prompt_ids[i]))
                result.response_ids.append(ids)
                result.logprobs.append(lps)
                result.finished.append(comp.finish_reason == "stop")
        result.response_text.extend(self.tokenizer.batch_decode(result.response_ids, skip_special_tokens=True))
        return result

    def update_weights(self, buckets, version: int) -> dict:
        """Load weights bucket by bucket (one RPC each), reset the prefix cache, bump the version.

        Buckets must not split a layer (see `bucket_by_layer`)."""
        start = time.perf_counter()
        loaded = 0
        for bucket in buckets:
            loaded += self.llm.collective_rpc("rlextra_load_weights", args=(bucket,))[0]
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        return {"version": self.weight_version, "tensors": loaded, "time_s": time.perf_counter() - start}

    def join_weight_group(self, host: str, port: int, world_size: int, first_rank: int, timeout_s: float) -> list:
        """Every worker of this engine joins a new weight group (ranks `first_rank`, ...); returns their ranks."""
        args = (host, port, world_size, first_rank, timeout_s)
        return self.llm.collective_rpc("rlextra_join_weight_group", args=args)

    def receive_weights(self, version: int) -> dict:
        """Receive the sync at `version` over the weight group, reset the prefix cache, bump the version."""
        start = time.perf_counter()
        per_worker = self.llm.collective_rpc("rlextra_receive_weights", args=(version,))
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        return {
            "version": self.weight_version,
            "tensors": per_worker[0]["tensors"],
            "time_s": max(w["load_s"] for w in per_worker),
            "total_s": time.perf_counter() - start,
        }

    def state_dict(self) -> dict:
        return self.llm.collective_rpc("rlextra_state_dict")[0]

    def get_weight_version(self) -> int:
        return self.weight_version

    def ping(self) -> int:
        return os.getpid()

    def kv_capacity(self) -> float:
        """How many sequences of max_model_len tokens the engine's KV cache holds at once (vLLM's max concurrency)."""
        return float(self.llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency)
