"""Rollout throughput: the vLLM RolloutActor vs transformers `generate`, same tiny model, same batch.

Both sample at temperature 1 with the same response cap, on one thread each (the rollout actor runs vLLM
in-process with OMP_NUM_THREADS=1; transformers gets torch.set_num_threads(1)). Generated tokens are
counted up to and including EOS. Headline: vLLM tokens/s ÷ transformers tokens/s (goal ≥ 10).

    python bench/rollout_throughput.py [--prompts 128] [--samples 8] [--max-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets up sys.path and env)
from common import RESULTS, build_model_dir, emit, start_ray


def hf_generate_tokens_per_s(model_path, prompt_ids, samples, max_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([p for p in prompt_ids for _ in range(samples)])  # toy prompts have equal length
    rates = []
    for r in range(repeats):
        torch.manual_seed(r)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        elapsed = time.perf_counter() - start
        gen = out[:, ids.shape[1] :]
        # tokens up to and including the first EOS
        is_eos = gen == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((gen.shape[0],), gen.shape[1]))
        rates.append(float(first.sum()) / elapsed)
    return statistics.median(rates)


def vllm_tokens_per_s(ray, model_path, prompt_ids, samples, max_tokens, repeats):
    from actors.rollout import RolloutActor, RolloutSpec
    from orchestrator.cluster import rollout_actor_env
    from orchestrator.config import RolloutConfig
    from orchestrator.messages import SamplingConfig

    actor = (
        ray.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": rollout_actor_env(1)})
        .remote(RolloutSpec(model_path, RolloutConfig(max_model_len=64, kv_cache_mb=128, max_num_seqs=512), seed=0))
    )
    try:
        ray.get(actor.generate.remote(prompt_ids[:4], SamplingConfig(n=2, max_tokens=4)))  # warm-up
        rates = []
        for r in range(repeats):
            start = time.perf_counter()
            res = ray.get(actor.generate.remote(prompt_ids, SamplingConfig(n=samples, max_tokens=max_tokens, seed=r)))
            elapsed = time.perf_counter() - start  # includes the Ray round trip
            rates.append(sum(len(x) for x in res.response_ids) / elapsed)
        return statistics.median(rates)
    finally:
        ray.kill(actor)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from orchestrator.config import ToyTaskConfig
    from orchestrator.toy_task import build_tokenizer, make_splits

    tok = build_tokenizer()
    rows = make_splits(ToyTaskConfig(num_train=10, num_eval=args.prompts), seed=0)["eval"]
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        # An untrained model: it rarely emits EOS early, so both engines generate near max_tokens per sample.
        model_path, n_params = build_model_dir("tiny", Path(tmp))
        ray = start_ray()
        try:
            v = vllm_tokens_per_s(ray, model_path, prompt_ids, args.samples, args.max_tokens, args.repeats)
        finally:
            ray.shutdown()
        h = hf_generate_tokens_per_s(model_path, prompt_ids, args.samples, args.max_tokens, args.repeats)
    ratio = v / h
    print(
        f"model: tiny Qwen2, {n_params} parameters; batch {args.prompts} prompts x {args.samples} samples, "
        f"<= {args.max_tokens} tokens"
    )
    print(f"vLLM RolloutActor: {v:,.0f} tokens/s   transformers generate: {h:,.0f} tokens/s   ratio {ratio:.1f}x")
    _plot(v, h)
    emit(
        {
            "metric": "rollout_tokens_per_s_ratio_vllm_over_transformers",
            "value": round(ratio, 2),
            "goal": 10,
            "vllm_tokens_per_s": round(v, 1),
            "transformers_tokens_per_s": round(h, 1),
            "prompts": args.prompts,
            "samples": args.samples,
            "max_tokens": args.max_tokens,
            "params": n_params,
            "plot": str(RESULTS / "rollout_throughput.png"),
        }
    )


def _plot(v, h):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["vLLM actor", "transformers\ngenerate"], [v, h], color=["#2b7bba", "#aaaaaa"])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Rollout throughput (tiny model): {v / h:.1f}x")
    fig.tight_layout()
    fig.savefig(RESULTS / "rollout_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
