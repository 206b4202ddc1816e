"""The embedded default: a tiny Qwen2 model, a character tokenizer and a synthetic arithmetic task.

Why this task looks the way it does (see ``shared/notes/toy-linearity.md``): RLVR on real reasoning models
mostly *re-weights* behaviour the model already has (connector words like "wait" drift steadily), while a
from-scratch toy that RL must teach to fix its own errors moves mostly by gradient noise. So the warm start
here is trained on a *mixture of two well-formed procedures*:

- ``C`` + the correct answer (the careful procedure, with carries), and
- ``N`` + the answer computed digit by digit *without carries* (a subtly wrong procedure; it is right
  exactly when no carry occurs).

The response is ``<mode><digits><eos>``; the verifier only checks the final number, as a math verifier
would. The warm-started model samples ``C`` with probability ≈ ``careful_fraction`` and is then usually
right, so its sampled accuracy starts around 30–45 % and RL shifts the mix toward ``C``.

Everything is generated deterministically from a seed and handed to the rest of the system through
``datasets`` and ``save_pretrained`` directories, exactly as a real model and dataset would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

from orchestrator.config import TinyModelConfig, ToyTaskConfig, WarmStartConfig, check_fields

TOKENIZER_VERSION = 3  # bump when build_tokenizer changes (part of the warm-start cache key)

# Character vocabulary. Special tokens first so their ids are stable.
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789+*=CN")
CODE_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII for the code variant
OPERATORS = {"add": "+", "mul": "*"}


# ----------------------------------------------------------------------------------------------- arithmetic


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)]


def no_carry_result(op: str, a: int, b: int) -> int:
    """The subtly wrong procedure: digit-wise result, each column taken mod 10, carries dropped."""
    if op == "add":
        width = max(len(str(a)), len(str(b)))
        da, db = _digits(a, width), _digits(b, width)
        return int("".join(str((x + y) % 10) for x, y in zip(da, db)))
    if op == "mul":  # b is a single digit
        return int("".join(str((x * b) % 10) for x in _digits(a, len(str(a)))))
    raise ValueError(op)


def correct_result(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a * b


def make_problem(rng: random.Random, spec: ToyTaskConfig) -> tuple[str, str, int, int]:
    """Returns (prompt, answer, a, b)."""
    lo, hi = 10 ** (spec.digits - 1), 10**spec.digits - 1
    a = rng.randint(lo, hi)
    b = rng.randint(lo, hi) if spec.op == "add" else rng.randint(2, 9)
    return f"{a}{OPERATORS[spec.op]}{b}=", str(correct_result(spec.op, a, b)), a, b


def make_splits(spec: ToyTaskConfig, seed: int) -> dict[str, list[dict]]:
    """Deterministic, disjoint train / eval splits of {"prompt", "answer"} records."""
    check_fields(spec, "data.toy")
    if spec.op == "code":
        from verifiers.code_tasks import make_code_tasks

        tasks = make_code_tasks(spec.num_eval + spec.num_train, seed=seed)
        rows = [{"prompt": t["prompt"], "answer": t["answer"]} for t in tasks]
        return {"train": rows[spec.num_eval :], "eval": rows[: spec.num_eval]}
    rng = random.Random(f"toy-{spec.op}-{spec.digits}-{seed}")
    seen: set[str] = set()
    eval_rows: list[dict] = []
    while len(eval_rows) < spec.num_eval:
        prompt, answer, _, _ = make_problem(rng, spec)
        if prompt not in seen:
            seen.add(prompt)
            eval_rows.append({"prompt": prompt, "answer": answer})
    train_rows = []
    for _ in range(spec.num_train):  # duplicates allowed in train (small digit counts have few problems)
        prompt, answer, _, _ = make_problem(rng, spec)
        while prompt in seen:
            prompt, answer, _, _ = make_problem(rng, spec)
        train_rows.append({"prompt": prompt, "answer": answer})
    return {"train": train_rows, "eval": eval_rows}


def code_warm_start_example(rng: random.Random, spec: ToyTaskConfig) -> tuple[str, str, str]:
    """Code variant: (prompt, response, reference). The response holds the canonical solution, or (the wrong
    procedure) the right signature with the body of another problem's solution."""
    from verifiers.code_tasks import KINDS, make_code_tasks

    task = make_code_tasks(1, seed=rng.randrange(10**9))[0]
    names = [k.name for k in KINDS]
    solution = task["canonical_solution"]
    if rng.random() >= spec.careful_fraction:
        other = KINDS[(names.index(task["kind"]) + 1 + rng.randrange(len(KINDS) - 1)) % len(KINDS)]
        solution = solution.split("\n", 1)[0] + "\n" + other.solution.split("\n", 1)[1]
    return task["prompt"], f"```python\n{solution}```", task["answer"]


def warm_start_text(rng: random.Random, spec: ToyTaskConfig) -> tuple[str, str]:
    """One supervised example from the mixture: (prompt, response without eos)."""
    if spec.op == "code":
        return code_warm_start_example(rng, spec)[:2]
    prompt, _, a, b = make_problem(rng, spec)
    if rng.random() < spec.careful_fraction:
        return prompt, f"C{correct_result(spec.op, a, b)}"
    return prompt, f"N{no_carry_result(spec.op, a, b)}"


# ------------------------------------------------------------------------------------ tokenizer and model


def build_tokenizer(op: str = "add"):
    """A character-level tokenizer built with `tokenizers`, wrapped for transformers and vLLM.

    The arithmetic variants need 15 characters; the code variant printable ASCII and newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + (CODE_CHARS if op == "code" else CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate characters back without spaces
    # add_special_tokens=True prepends <bos>, as real tokenizers do, so generic code needs no special case.
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )
    tok.padding_side = "left"
    return tok


def build_tiny_model(spec: TinyModelConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


# ------------------------------------------------------------------------------------------- warm start


def seeded(spec, seed: int) -> dict:
    """A config's fields and the seed: what a cached artefact built from it depends on."""
    return {**asdict(spec), "seed": seed}


def cache_key(*parts) -> str:
    blob = json.dumps(list(parts), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode_batch(tok, pairs: list[tuple[str, str]]):
    """Left-aligned prompt+response+eos sequences, padded on the right; loss only on response tokens."""
    import torch

    ids, masks = [], []
    for prompt, response in pairs:
        p = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        r = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        ids.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    loss_mask = torch.zeros((len(ids), width), dtype=torch.float32)
    for i, (x, m) in enumerate(zip(ids, masks)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return input_ids, attn, loss_mask


def train_warm_start(model, tok, task: ToyTaskConfig, ws: WarmStartConfig, seed: int, log=print) -> None:
    """Plain-torch SFT on the mixture (cheap; runs once and is cached)."""
    import torch

    rng = random.Random(f"warm-{seed}-{seed}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(1, ws.steps))
    )
    model.train()
    for step in range(ws.steps):
        pairs = [warm_start_text(rng, task) for _ in range(ws.batch_size)]
        input_ids, attn, loss_mask = _encode_batch(tok, pairs)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        target, mask = input_ids[:, 1:], loss_mask[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
        )
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == ws.steps - 1:
            log(f"warm start step {step}/{ws.steps} loss {loss.item():.4f}")
    model.eval()


def prepare_toy_model(
    cache_dir: str | os.PathLike,
    task: ToyTaskConfig,
    model_spec: TinyModelConfig,
    ws: WarmStartConfig,
    seed: int,
    log=print,
) -> Path:
    """Build (or reuse from the cache) the warm-started tiny model; returns its `save_pretrained` dir.

    The cache key covers every spec field, so changing the task, model or warm start builds a new one.
    Written to a temporary folder and renamed into place, so a killed build never leaves a half model.
    """
    import torch

    check_fields(task, "data.toy")
    parts = {"task": seeded(task, seed), "model": seeded(model_spec, seed), "warm_start": seeded(ws, seed)}
    out = Path(cache_dir) / f"toy-{task.op}{task.digits}-{cache_key(*parts.values(), TOKENIZER_VERSION)}"
    if (out / "config.json").exists() and (out / "rlextra_toy.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    torch_threads = torch.get_num_threads()
    tok = build_tokenizer(task.op)
    model = build_tiny_model(model_spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed)
    log(
        f"building the warm start in {out} ({sum(p.numel() for p in model.parameters())} parameters, "
        f"{ws.steps} SFT steps on {torch_threads} threads)"
    )
    train_warm_start(model, tok, task, ws, seed, log=log)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "rlextra_toy.json").write_text(json.dumps(parts, indent=2))
    if out.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def write_toy_dataset(data_dir: str | os.PathLike, task: ToyTaskConfig, seed: int) -> dict[str, Path]:
    """Write the splits as jsonl files (idempotent) so they load through `datasets` like real data."""
    out = Path(data_dir) / f"toy-{task.op}{task.digits}-{cache_key(seeded(task, seed))}"
    paths = {split: out / f"{split}.jsonl" for split in ("train", "eval")}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(task, seed).items():
        tmp = paths[split].with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, paths[split])
    return paths
