"""Logits-extrapolation sampling: the batched sampler vs a prompt-by-prompt two-model loop like the paper's code.

Both sample from `l_t0 + α (l_t1 − l_t0)` with the paper's settings (temperature 0.6, top-p 0.95, k samples per
prompt) on the same two models and the same prompts:
- **loop** — the paper's `acceleration/logits_extrapolation.py` structure: one prompt at a time, its k samples as
  one batch (the prompt prefilled k times), two KV caches, finished rows dropped from both caches each step;
- **batched** — `linearity.logits_extrapolation.LogitsExtrapolationSampler`: every prompt × k samples at once
  (left-padded, per-row positions), one prefill per prompt, rows dropped at EOS.
Both use the same mixing / temperature / top-p code, so the ratio measures the batching alone.

The models are random Qwen2s with Qwen2.5's vocabulary size (151,936 — the softmax, top-p sort and output
projection over a real vocabulary are a large part of each step); with random weights no row meets EOS, so
both sides generate exactly prompts × k × max_tokens tokens. Prompts are random token ids of 16–64 tokens.
A greedy run of both on a few prompts must give the same tokens (reported as `greedy_match`).

    python bench/logits_extrapolation.py [--shapes tiny,small] [--prompts 16] [--k 8] [--max-tokens 12]

Each implementation runs twice, in the order batched, loop, loop, batched, and the times are summed (on this
shared machine the load drifts by the minute); CPU time of the process is reported beside wall time.

Headline: tokens/s batched ÷ tokens/s loop on the first shape. Plot: bench/results/logits_extrapolation.png.
"""

from __future__ import annotations

import argparse
import random
import time

import common  # noqa: F401  (sys.path, env)
from common import RESULTS, emit

QWEN_VOCAB = 151_936
# hidden, layers, heads, kv heads, intermediate (head_dim 32 or 64); `init` = the weights' std, wide enough that
# the next-token distributions are peaked like a trained model's (a nucleus of tens of tokens at T = 0.6, top-p
# 0.95, reported as `nucleus_median`); the default 0.02 gives near-uniform rows over the whole vocabulary.
SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512, init=0.3),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1536, init=0.2),
}


def build_pair(shape: str, vocab: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=s["init"],
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(Qwen2ForCausalLM(config).eval())
    return models


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(15, 63))] for _ in range(n)]


def loop_generate(m0, m1, prompts, alpha, n, temperature, top_p, max_tokens, eos_id, seed):
    """The paper's structure: prompt by prompt, k rows each (the prompt prefilled k times), two caches, finished
    rows dropped. Same per-step kernels as the batched sampler (last-position logits only, fp32 mixing, top-p
    among candidates, inverse-CDF draw), so only the batching differs. Returns token lists, prompt-major."""
    import torch

    from linearity.logits_extrapolation import mix_logits, sample_top_p

    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p]).expand(n, -1)
            o0, o1 = (
                m0(input_ids=ids, use_cache=True, logits_to_keep=1),
                m1(input_ids=ids, use_cache=True, logits_to_keep=1),
            )
            l0, l1, c0, c1 = o0.logits[:, -1], o1.logits[:, -1], o0.past_key_values, o1.past_key_values
            rows, active, pos = [[] for _ in range(n)], torch.arange(n), len(p)
            for step in range(max_tokens):
                mixed = mix_logits(l0, l1, alpha)
                tok = mixed.argmax(-1) if temperature == 0 else sample_top_p(mixed / temperature, top_p, gen)[0]
                for r, t in zip(active.tolist(), tok.tolist()):
                    rows[r].append(t)
                keep = (tok != eos_id).nonzero()[:, 0]
                if step == max_tokens - 1 or keep.numel() == 0:
                    break
                if keep.numel() < tok.numel():
                    c0.batch_select_indices(keep)
                    c1.batch_select_indices(keep)
                    active, tok = active[keep], tok[keep]
                position = torch.full((tok.numel(), 1), pos)
                o0 = m0(
                    input_ids=tok[:, None], position_ids=position, past_key_values=c0, use_cache=True, logits_to_keep=1
                )
                o1 = m1(
                    input_ids=tok[:, None], position_ids=position, past_key_values=c1, use_cache=True, logits_to_keep=1
                )
                l0, l1, pos = o0.logits[:, -1], o1.logits[:, -1], pos + 1
            out.extend(rows)
    return out


def nucleus_median(m0, m1, prompts, alpha: float, temperature: float, top_p: float) -> int:
    """Median size of the first step's nucleus over the prompts (how peaked the sampled distributions are)."""
    import torch

    from linearity.logits_extrapolation import processed_logits

    with torch.inference_mode():
        sizes = [
            int(
                torch.isfinite(
                    processed_logits(
                        m0(torch.tensor([p])).logits[:, -1],
                        m1(torch.tensor([p])).logits[:, -1],
                        alpha,
                        temperature,
                        top_p,
                    )
                ).sum()
            )
            for p in prompts
        ]
    return sorted(sizes)[len(sizes) // 2]


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, generated tokens) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def measure(shape: str, args) -> dict:
    """Both implementations on the same models, prompts and settings, in the order batched, loop, loop, batched
    (drifts in the load of this shared machine hit both alike); times summed per implementation."""
    from linearity.logits_extrapolation import LogitsExtrapolationSampler, SamplerConfig

    m0, m1 = build_pair(shape, args.vocab)
    prompts = make_prompts(args.prompts, args.vocab)
    sampler = LogitsExtrapolationSampler(m0, m1, eos_ids=[2], pad_id=0)
    settings = dict(alpha=args.alpha, n=args.k, temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, seed=0)

    # equivalence check: greedy tokens of both implementations on a few prompts
    few = prompts[:4]
    greedy_b = sampler.generate(few, SamplerConfig(**{**settings, "temperature": 0.0, "n": 1})).response_ids
    greedy_l = loop_generate(m0, m1, few, args.alpha, 1, 0.0, 1.0, args.max_tokens, 2, 0)

    run = {
        "batched": lambda: (
            sampler.generate(prompts, SamplerConfig(**settings, max_batch_rows=args.max_batch_rows)).num_tokens
        ),
        "loop": lambda: sum(
            len(r) for r in loop_generate(m0, m1, prompts, args.alpha, args.k, 0.6, 0.95, args.max_tokens, 2, 0)
        ),
    }
    totals = {name: [0.0, 0.0, 0] for name in run}
    for name in ("batched", "loop", "loop", "batched"):
        for i, x in enumerate(timed(run[name])):
            totals[name][i] += x
    (wb, cb, tb), (wl, cl, tl) = totals["batched"], totals["loop"]
    params = sum(p.numel() for p in m0.parameters())
    nucleus = nucleus_median(m0, m1, prompts[:8], args.alpha, 0.6, 0.95)
    print(
        f"{shape}: {params / 1e6:.1f}M params x 2, nucleus ~{nucleus} tokens; batched {tb} tokens in {wb:.2f} s "
        f"({tb / wb:.0f} tok/s, CPU {cb:.1f} s), loop {tl} tokens in {wl:.2f} s ({tl / wl:.0f} tok/s, CPU {cl:.1f} s)",
        flush=True,
    )
    return {
        "params_per_model": params,
        "batched_tokens": tb,
        "loop_tokens": tl,
        "batched_s": wb,
        "loop_s": wl,
        "batched_cpu_s": cb,
        "loop_cpu_s": cl,
        "batched_tokens_per_s": tb / wb,
        "loop_tokens_per_s": tl / wl,
        "speedup": (tb / wb) / (tl / wl),
        "speedup_cpu_time": (tb / cb) / (tl / cl),
        "greedy_match": greedy_b == greedy_l,
        "nucleus_median": nucleus,
    }


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results)
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(shapes), 3.6))
    x = range(len(shapes))
    ax.bar(
        [i - 0.2 for i in x],
        [results[s]["loop_tokens_per_s"] for s in shapes],
        0.4,
        label="prompt-by-prompt loop (paper)",
    )
    ax.bar([i + 0.2 for i in x], [results[s]["batched_tokens_per_s"] for s in shapes], 0.4, label="batched sampler")
    for i, s in enumerate(shapes):
        ax.text(i + 0.2, results[s]["batched_tokens_per_s"], f"{results[s]['speedup']:.1f}x", ha="center", va="bottom")
    ax.set_xticks(list(x), [f"{s}\n({results[s]['params_per_model'] / 1e6:.0f}M x 2)" for s in shapes])
    ax.set_ylabel("generated tokens / s")
    ax.set_title("logits extrapolation, T=0.6, top-p 0.95")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tiny", help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    p.add_argument("--max-batch-rows", type=int, default=1024)
    args = p.parse_args()
    import torch

    shapes = [s for s in args.shapes.split(",") if s]
    results = {s: measure(s, args) for s in shapes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "logits_extrapolation.png"
    plot(results, png)
    emit(
        {
            "metric": "logits_extrapolation_speedup",
            "value": round(results[shapes[0]]["speedup"], 3),
            "goal": 5.0,
            "unit": "x tokens/s, batched / prompt-by-prompt loop",
            "shape": shapes[0],
            "settings": {
                "prompts": args.prompts,
                "k": args.k,
                "max_tokens": args.max_tokens,
                "alpha": args.alpha,
                "temperature": 0.6,
                "top_p": 0.95,
                "vocab": args.vocab,
                "threads": torch.get_num_threads(),
            },
            "shapes": results,
            "plot": str(png),
        }
    )


if __name__ == "__main__":
    main()
