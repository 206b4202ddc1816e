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

That one behaviour flips in one jump. ``op=skills`` imitates RLVR on a reasoning model, where many behaviours
improve at different rates over many steps: a mixture of *sub-skills* (``add22`` = 47+85, ``sub21`` = 85-7, ...),
each with its own flawed procedure (add / mul drop carries, sub takes each column's smaller digit from its larger
one), its own pair of mode tokens (sub-skill i announces its procedures with ``CDEFGHIJ``[i] / ``NOPQRSTU``[i]:
distinct behaviours are distinct words, so lifting one sub-skill's choice does not lift them all; with one shared
``C`` the whole mixture flipped within ~30 GRPO steps) and its own probability of choosing the careful procedure in
the warm start (``careful_shares``, 0.3 down to 0.001: the rarest so seldom chosen that GRPO samples a rewarded
answer for them only every few steps, as for a behaviour a reasoning model rarely shows). The warm start teaches
both procedures of every sub-skill equally often and the choice through a soft target on the mode token, so a
sub-skill that rarely *chooses* the careful procedure still carries it out well, as a real model does with a
behaviour it rarely uses. Only problems that need the careful procedure are drawn, so the flawed one is always wrong
and a sub-skill's accuracy is its share of careful choices times how well it is carried out. RL lifts the common
sub-skills first and the rare ones later, when it finds them, so the aggregate rises over 100+ steps rather than in
one jump; a large lr damages the procedures (GRPO gets worse above a stable lr). Every sub-skill's careful procedure
is checked before the warm start is cached (see ``prepare_toy_model``); measured curves: ``bench/task_curves.py``.

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

from orchestrator.config import (
    SKILL_CAREFUL_MARKERS,
    SKILL_FLAWED_MARKERS,
    SKILL_OPERATORS,
    ConfigError,
    TinyModelConfig,
    ToyTaskConfig,
    WarmStartConfig,
    check_fields,
    parse_skill,
)

TOKENIZER_VERSION = 3  # bump when build_tokenizer changes (part of the warm-start cache key)
SKILLS_WARM_START_VERSION = 3  # op=skills: bump when its warm-start recipe changes (3: per-skill markers, soft mode)

# Character vocabulary. Special tokens first so their ids are stable.
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789+*=CN")
SKILL_CHARS = CHARS + ["-"] + [m for m in SKILL_CAREFUL_MARKERS + SKILL_FLAWED_MARKERS if m not in CHARS]
CODE_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII for the code variant
OPERATORS = {"add": "+", "mul": "*"}


# ----------------------------------------------------------------------------------------------- arithmetic


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)]


def flawed_result(op: str, a: int, b: int) -> int:
    """The subtly wrong procedure, column by column, right exactly when no carry (add, mul) or borrow (sub) occurs:
    add / mul take each column mod 10 and drop the carries; sub takes each column's smaller digit from its larger."""
    if op == "add":
        width = max(len(str(a)), len(str(b)))
        da, db = _digits(a, width), _digits(b, width)
        return int("".join(str((x + y) % 10) for x, y in zip(da, db)))
    if op == "sub":  # a >= b
        da, db = _digits(a, len(str(a))), _digits(b, len(str(a)))
        return int("".join(str(abs(x - y)) for x, y in zip(da, db)))
    if op == "mul":  # b is a single digit
        return int("".join(str((x * b) % 10) for x in _digits(a, len(str(a)))))
    raise ValueError(op)


def correct_result(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def make_problem(rng: random.Random, spec: ToyTaskConfig) -> tuple[str, str, int, int]:
    """Returns (prompt, answer, a, b)."""
    lo, hi = 10 ** (spec.digits - 1), 10**spec.digits - 1
    a = rng.randint(lo, hi)
    b = rng.randint(lo, hi) if spec.op == "add" else rng.randint(2, 9)
    return f"{a}{OPERATORS[spec.op]}{b}=", str(correct_result(spec.op, a, b)), a, b


def skill_problem(rng: random.Random, skill: str) -> tuple[str, str, int, int]:
    """One problem of sub-skill `skill` (e.g. add21) that needs the careful procedure: (prompt, answer, a, b)."""
    op, da, db = parse_skill(skill)
    while True:
        a = rng.randint(10 ** (da - 1), 10**da - 1)
        b = rng.randint(2, 9) if op == "mul" else rng.randint(10 ** (db - 1), 10**db - 1)
        if (op != "sub" or b <= a) and flawed_result(op, a, b) != correct_result(op, a, b):
            return f"{a}{SKILL_OPERATORS[op]}{b}=", str(correct_result(op, a, b)), a, b


def skill_of(prompt: str) -> str:
    """The sub-skill of an op=skills prompt: `47+8=` → add21."""
    for op, sign in SKILL_OPERATORS.items():
        if sign in prompt:
            a, b = prompt.rstrip("=").split(sign)
            return f"{op}{len(a)}{len(b)}"
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")


def make_splits(spec: ToyTaskConfig, seed: int) -> dict[str, list[dict]]:
    """Deterministic, disjoint train / eval splits of {"prompt", "answer"} records."""
    check_fields(spec, "data.toy")
    if spec.op == "code":
        from verifiers.code_tasks import make_code_tasks

        tasks = make_code_tasks(spec.num_eval + spec.num_train, seed=seed)
        rows = [{"prompt": t["prompt"], "answer": t["answer"]} for t in tasks]
        return {"train": rows[spec.num_eval :], "eval": rows[: spec.num_eval]}
    if spec.op == "skills":
        rng = random.Random(f"toy-skills-{seed}")
        # eval: the sub-skills in turn (an even spread); train: a sub-skill drawn at random for each row, kept
        # when a drawn prompt is an eval one (redrawing the sub-skill would starve those with few problems)
        train_skills = [rng.choice(spec.skills) for _ in range(spec.num_train)]

        def draw_eval(i: int) -> tuple[str, str, int, int]:
            return skill_problem(rng, spec.skills[i % len(spec.skills)])

        def draw_train(i: int) -> tuple[str, str, int, int]:
            return skill_problem(rng, train_skills[i])

    else:
        rng = random.Random(f"toy-{spec.op}-{spec.digits}-{seed}")

        def draw_eval(i: int) -> tuple[str, str, int, int]:
            return make_problem(rng, spec)

        draw_train = draw_eval
    seen: set[str] = set()
    eval_rows: list[dict] = []
    while len(eval_rows) < spec.num_eval:
        prompt, answer, _, _ = draw_eval(len(eval_rows))
        if prompt not in seen:
            seen.add(prompt)
            eval_rows.append({"prompt": prompt, "answer": answer})
    train_rows = []
    for i in range(spec.num_train):  # duplicates allowed in train (small digit counts have few problems)
        prompt, answer, _, _ = draw_train(i)
        while prompt in seen:
            prompt, answer, _, _ = draw_train(i)
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


def skill_markers(index: int) -> tuple[str, str]:
    """op=skills: the (careful, flawed) mode tokens of the sub-skill at `index` in `skills`: its own pair, as
    distinct reasoning behaviours are distinct words, so RL lifting one sub-skill's choice does not lift them all."""
    return SKILL_CAREFUL_MARKERS[index], SKILL_FLAWED_MARKERS[index]


def skill_warm_start_example(
    rng: random.Random, spec: ToyTaskConfig, exclude: frozenset[str] = frozenset()
) -> tuple[str, str, float, int]:
    """op=skills: (prompt, response without eos, the sub-skill's careful share, its index). The procedure is drawn
    50/50, so every sub-skill's careful and flawed procedure is learnt equally well, however rare its careful share;
    the share is taught on the mode token alone (a soft target, see `train_warm_start`). A real model that rarely
    *chooses* a behaviour still knows how to carry it out -- RL re-weights the choice."""
    i = rng.randrange(len(spec.skills))
    prompt, answer, a, b = skill_problem(rng, spec.skills[i])
    while prompt in exclude:
        prompt, answer, a, b = skill_problem(rng, spec.skills[i])
    careful, flawed = skill_markers(i)
    if rng.random() < 0.5:
        return prompt, f"{careful}{answer}", spec.careful_shares[i], i
    return prompt, f"{flawed}{flawed_result(parse_skill(spec.skills[i])[0], a, b)}", spec.careful_shares[i], i


def warm_start_text(rng: random.Random, spec: ToyTaskConfig) -> tuple[str, str]:
    """One supervised example from the add / mul / code mixture: (prompt, response without eos). op=skills draws
    through `skill_warm_start_example`, which also carries the mode token's target."""
    if spec.op == "code":
        return code_warm_start_example(rng, spec)[:2]
    prompt, _, a, b = make_problem(rng, spec)
    if rng.random() < spec.careful_fraction:
        return prompt, f"C{correct_result(spec.op, a, b)}"
    return prompt, f"N{flawed_result(spec.op, a, b)}"


# ------------------------------------------------------------------------------------ tokenizer and model


def build_tokenizer(op: str = "add"):
    """A character-level tokenizer built with `tokenizers`, wrapped for transformers and vLLM.

    The arithmetic variants need 15 characters (op=skills 16, with `-`); the code variant printable ASCII and
    newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = {"code": CODE_CHARS, "skills": SKILL_CHARS}.get(op, CHARS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
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
    fields = spec.cache_fields() if isinstance(spec, ToyTaskConfig) else asdict(spec)
    return {**fields, "seed": seed}


def variant_name(task: ToyTaskConfig) -> str:
    """How cached folders name a variant: add2, mul2, code1, skills."""
    return "skills" if task.op == "skills" else f"{task.op}{task.digits}"


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


def with_soft_mode_target(nll, logits, mask, mode_ids, shares):
    """op=skills: replace the loss at each row's mode token (its first response token) by the cross-entropy against
    (careful share, 1 - share) over the row's (careful, flawed) markers, so the warm start *chooses* the careful
    procedure with the sub-skill's share while both procedures are trained equally.
    nll, mask: [B, T-1]; logits: [B, T-1, V]; mode_ids: [B, 2] token ids (careful, flawed); shares: [B]."""
    import torch

    first = mask.argmax(dim=1)  # [B] position predicting the mode token
    rows = torch.arange(mask.size(0))
    logp = torch.log_softmax(logits[rows, first], dim=-1).gather(1, mode_ids)  # [B, 2]
    soft = -(shares * logp[:, 0] + (1 - shares) * logp[:, 1])
    out = nll.clone()
    out[rows, first] = soft
    return out


def train_warm_start(
    model, tok, task: ToyTaskConfig, ws: WarmStartConfig, seed: int, attempt: int = 0, log=print
) -> None:
    """Plain-torch SFT on the mixture (cheap; runs once and is cached). op=skills never trains on an eval prompt.
    A later `attempt` (a rebuild after a failed check) draws its own data order."""
    import torch

    rng = random.Random(f"warm-{seed}-{seed}" if attempt == 0 else f"warm-{seed}-attempt{attempt}")
    exclude = frozenset(r["prompt"] for r in make_splits(task, seed)["eval"]) if task.op == "skills" else frozenset()
    torch.manual_seed(init_seed(seed, attempt))
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(1, ws.steps))
    )
    model.train()
    if task.op == "skills":
        marker_ids = torch.tensor([tok.convert_tokens_to_ids(list(skill_markers(i))) for i in range(len(task.skills))])
    for step in range(ws.steps):
        if task.op == "skills":
            examples = [skill_warm_start_example(rng, task, exclude) for _ in range(ws.batch_size)]
            pairs, shares = [(p, r) for p, r, _, _ in examples], [s for _, _, s, _ in examples]
            mode_ids = marker_ids[[i for _, _, _, i in examples]]
        else:
            pairs, shares = [warm_start_text(rng, task) for _ in range(ws.batch_size)], None
        input_ids, attn, loss_mask = _encode_batch(tok, pairs)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        target, mask = input_ids[:, 1:], loss_mask[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
        )
        if shares is not None:
            nll = with_soft_mode_target(nll.view_as(mask), logits, mask, mode_ids, torch.tensor(shares)).reshape(-1)
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == ws.steps - 1:
            log(f"warm start step {step}/{ws.steps} loss {loss.item():.4f}")
    model.eval()


def init_seed(seed: int, attempt: int) -> int:
    """The torch seed of a warm-start attempt: the job's seed first, then one derived from (seed, attempt)."""
    return seed if attempt == 0 else int(cache_key(seed, attempt), 16) % 2**31


def greedy_responses(model, tok, prompts: list[str], max_tokens: int = 8) -> list[str]:
    """Greedy continuations of `prompts` (plain torch, left-padded batch; the text up to eos)."""
    import torch

    rows = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # long[B, P]
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # long[B, P]
    done = torch.zeros(len(rows), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_tokens):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]  # float[B, V]
            nxt = torch.where(done, tok.pad_token_id, logits.argmax(-1))
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
            done |= nxt == tok.eos_token_id
            if done.all():
                break
    return [
        tok.decode([t for t, m in zip(row[width:], keep[width:]) if m and t != tok.eos_token_id])
        for row, keep in zip(ids.tolist(), mask.tolist())
    ]


def procedure_fidelity(model, tok, task: ToyTaskConfig, seed: int, per_skill: int = 64) -> dict[str, dict]:
    """op=skills: for each sub-skill, the share of held-out problems (never eval prompts) on which the model,
    given the mode token, carries out the careful (`C`) and the flawed (`N`) procedure exactly (greedy)."""
    rng = random.Random(f"fidelity-{seed}")
    exclude = {r["prompt"] for r in make_splits(task, seed)["eval"]}
    result = {}
    for index, skill in enumerate(task.skills):
        op = parse_skill(skill)[0]
        careful_marker, flawed_marker = skill_markers(index)
        problems = []
        while len(problems) < per_skill:
            prompt, answer, a, b = skill_problem(rng, skill)
            if prompt not in exclude:
                problems.append((prompt, answer, str(flawed_result(op, a, b))))
        careful = greedy_responses(model, tok, [p + careful_marker for p, _, _ in problems])
        flawed = greedy_responses(model, tok, [p + flawed_marker for p, _, _ in problems])
        result[skill] = {
            "careful": sum(r == ans for r, (_, ans, _) in zip(careful, problems)) / per_skill,
            "flawed": sum(r == bad for r, (_, _, bad) in zip(flawed, problems)) / per_skill,
        }
    return result


WARM_START_ATTEMPTS = 3  # op=skills: fresh initialisations tried before a warm start that fails its check is an error


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

    op=skills checks the warm start before caching it: every sub-skill's careful and flawed procedure must be
    carried out on at least `data.toy.min_fidelity` of held-out problems. SFT of a tiny model sometimes stalls on a
    plateau for the whole budget (that is how one toy_add seed started at 0.06: neither procedure learnt), so a
    failed check rebuilds from a fresh initialisation, and after WARM_START_ATTEMPTS failures it is a ConfigError.
    """
    import torch

    check_fields(task, "data.toy")
    parts = {"task": seeded(task, seed), "model": seeded(model_spec, seed), "warm_start": seeded(ws, seed)}
    recipe = [SKILLS_WARM_START_VERSION] if task.op == "skills" else []
    out = Path(cache_dir) / f"toy-{variant_name(task)}-{cache_key(*parts.values(), TOKENIZER_VERSION, *recipe)}"
    if (out / "config.json").exists() and (out / "rlextra_toy.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = build_tokenizer(task.op)
    for attempt in range(WARM_START_ATTEMPTS):
        model = build_tiny_model(
            model_spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, init_seed(seed, attempt)
        )
        log(
            f"building the warm start in {out} ({sum(p.numel() for p in model.parameters())} parameters, "
            f"{ws.steps} SFT steps on {torch.get_num_threads()} threads)"
        )
        train_warm_start(model, tok, task, ws, seed, attempt, log=log)
        if task.op != "skills":
            break
        fidelity = procedure_fidelity(model, tok, task, seed)
        # Only the careful procedure bounds a sub-skill's accuracy: a flawed answer is wrong whether or not the
        # flawed procedure is carried out exactly (only problems that need the careful one are drawn).
        worst_skill, worst = min(fidelity.items(), key=lambda kv: kv[1]["careful"])
        if worst["careful"] >= task.min_fidelity:
            parts.update(fidelity=fidelity, attempts=attempt + 1)
            break
        failed = (
            f"{worst_skill}'s careful procedure carried out on {worst['careful']:.2f} of held-out problems, "
            f"below data.toy.min_fidelity {task.min_fidelity}"
        )
        log(f"warm start attempt {attempt + 1}/{WARM_START_ATTEMPTS}: {failed}")
    else:
        raise ConfigError(
            f"model.warm_start.steps: expected enough SFT steps to learn every sub-skill; after "
            f"{WARM_START_ATTEMPTS} attempts of {ws.steps} steps, {failed}"
        )
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
    out = Path(data_dir) / f"toy-{variant_name(task)}-{cache_key(seeded(task, seed))}"
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
