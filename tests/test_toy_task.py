"""The embedded toy: deterministic data, the two procedures, the tokenizer, and the warm-start cache."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from orchestrator.config import (
    SKILL_OPERATORS,
    ConfigError,
    TinyModelConfig,
    ToyTaskConfig,
    WarmStartConfig,
    parse_skill,
    skill_problem_count,
)
from orchestrator.toy_task import (
    build_tokenizer,
    correct_result,
    flawed_result,
    make_splits,
    prepare_toy_model,
    seeded,
    skill_markers,
    skill_of,
    skill_warm_start_example,
    warm_start_text,
    write_toy_dataset,
)
from verifiers import get_verifier


def test_no_carry_procedure_is_subtly_wrong():
    assert flawed_result("add", 12, 34) == 46 == correct_result("add", 12, 34)  # no carry: both agree
    assert flawed_result("add", 58, 67) == 15 and correct_result("add", 58, 67) == 125
    assert flawed_result("mul", 47, 6) == 42 and correct_result("mul", 47, 6) == 282
    assert flawed_result("mul", 21, 3) == 63 == correct_result("mul", 21, 3)


@pytest.mark.parametrize("op", ["add", "mul"])
def test_splits_are_deterministic_and_disjoint(op):
    spec = ToyTaskConfig(op=op, digits=2, num_train=300, num_eval=50)
    a, b = make_splits(spec, seed=7), make_splits(spec, seed=7)
    assert a == b
    assert make_splits(spec, seed=8) != a
    eval_prompts = {r["prompt"] for r in a["eval"]}
    assert len(eval_prompts) == 50 and not eval_prompts & {r["prompt"] for r in a["train"]}
    sign = "+" if op == "add" else "*"
    for row in a["train"][:20]:
        x, y = row["prompt"].rstrip("=").split(sign)
        assert row["answer"] == str(correct_result(op, int(x), int(y)))


def test_warm_start_mixture_and_verifier():
    spec = ToyTaskConfig(careful_fraction=0.3)
    rng = random.Random(0)
    samples = [warm_start_text(rng, spec) for _ in range(4000)]
    careful = [s for s in samples if s[1].startswith("C")]
    assert 0.27 < len(careful) / len(samples) < 0.33
    score = get_verifier("arith")
    for prompt, response in samples[:200]:
        a, b = map(int, prompt.rstrip("=").split("+"))
        ok = score(response, str(a + b))
        assert ok == (1.0 if response[1:] == str(a + b) else 0.0)
        if response.startswith("C"):
            assert ok == 1.0


def test_tokenizer_roundtrip_and_bos():
    tok = build_tokenizer()
    ids = tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "12+34="
    assert (
        tok.decode(tok("C46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], skip_special_tokens=True)
        == "C46"
    )


def test_bad_task_spec_names_the_field():
    ops = r"\['add', 'mul', 'code', 'skills'\]"
    with pytest.raises(ConfigError, match=rf"^data.toy.op: expected one of {ops}, got 'div'$"):
        make_splits(ToyTaskConfig(op="div"), seed=0)


def test_eval_split_larger_than_the_problem_space_is_refused():
    with pytest.raises(ConfigError, match=r"^data.toy.num_eval: expected fewer than the 81 distinct 1-digit problems"):
        make_splits(ToyTaskConfig(digits=1, num_eval=100), seed=0)


def test_warm_start_is_cached_and_reused(toy_model_path, cache_dir):
    calls = []
    again = prepare_toy_model(
        cache_dir,
        ToyTaskConfig(op="add", digits=1, num_train=2000, num_eval=40),
        TinyModelConfig(tie_word_embeddings=True),
        WarmStartConfig(steps=120, batch_size=64, lr=3e-3),
        seed=0,
        log=calls.append,
    )
    assert str(again) == toy_model_path and calls == []  # nothing rebuilt
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rlextra_toy.json"):
        assert (again / name).exists()


def test_dataset_files_load_through_datasets(tmp_path):
    import datasets

    paths = write_toy_dataset(tmp_path, ToyTaskConfig(num_train=100, num_eval=20), seed=0)
    ds = datasets.load_dataset("json", data_files=str(paths["eval"]), split="train")
    assert len(ds) == 20 and set(ds.column_names) == {"prompt", "answer"}
    assert write_toy_dataset(tmp_path, ToyTaskConfig(num_train=100, num_eval=20), seed=0) == paths  # idempotent


def test_code_variant_mixture_scores_through_the_sandbox():
    """The code toy: canonical solutions pass the sandboxed verifier, the wrong procedure fails."""
    from orchestrator.toy_task import code_warm_start_example
    from verifiers.code import score_code

    spec = ToyTaskConfig(op="code", careful_fraction=0.5, num_train=20, num_eval=5)
    splits = make_splits(spec, seed=0)
    assert len(splits["train"]) == 20 and len(splits["eval"]) == 5 and splits == make_splits(spec, seed=0)
    rng = random.Random(3)
    outcomes = set()
    for _ in range(8):
        prompt, response, reference = code_warm_start_example(rng, spec)
        assert response.startswith("```python\n") and response.endswith("```")
        outcomes.add(score_code(response, reference) == 1.0)
    assert outcomes == {True, False}, "the mixture holds both procedures"
    tok = build_tokenizer("code")
    text = prompt + response
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # lossless on code


# ------------------------------------------------------------------------------------------- op=skills


def _carries_or_borrows(op: str, a: int, b: int) -> bool:
    """Column arithmetic written out, lowest column first: does a carry (add, mul) or a borrow (sub) occur?"""
    xs = [int(d) for d in reversed(str(a))]
    ys = [int(d) for d in reversed(str(b).zfill(len(str(a))))]
    carry = 0
    for x, y in zip(xs, ys):
        if op == "add":
            carry = (x + y + carry) // 10
        elif op == "sub":
            carry = int(x - y - carry < 0)
        else:
            carry = (x * b + carry) // 10
        if carry:
            return True
    return False


@pytest.mark.parametrize("skill", ["add11", "add21", "add22", "sub21", "sub22", "mul11", "mul21"])
def test_each_flawed_procedure_is_wrong_exactly_where_a_carry_or_borrow_occurs(skill):
    """Every problem of the shape: the flawed answer differs from the correct one iff the column arithmetic needs a
    carry (add, mul) or a borrow (sub); the count of such problems is what the config computes."""
    op, da, db = parse_skill(skill)
    needs_care = 0
    for a in range(10 ** (da - 1), 10**da):
        for b in range(2, 10) if op == "mul" else range(10 ** (db - 1), 10**db):
            if op == "sub" and b > a:
                continue
            wrong = flawed_result(op, a, b) != correct_result(op, a, b)
            assert wrong == _carries_or_borrows(op, a, b), (op, a, b)
            needs_care += wrong
    assert needs_care == skill_problem_count(op, da, db) > 0


def test_flawed_procedures_on_examples():
    assert flawed_result("sub", 85, 47) == 42 and correct_result("sub", 85, 47) == 38  # 7-5 taken for 5-7
    assert flawed_result("sub", 305, 7) == 302 and correct_result("sub", 305, 7) == 298
    assert flawed_result("add", 47, 8) == 45 and correct_result("add", 47, 8) == 55
    assert flawed_result("sub", 96, 34) == 62 == correct_result("sub", 96, 34)  # no borrow: both agree


SKILLS = ToyTaskConfig(op="skills", num_train=3000, num_eval=320)  # 40 eval prompts per sub-skill


def test_skill_splits_are_deterministic_disjoint_and_even():
    a = make_splits(SKILLS, seed=3)
    assert a == make_splits(SKILLS, seed=3) and a != make_splits(SKILLS, seed=4)
    eval_prompts = [r["prompt"] for r in a["eval"]]
    assert len(set(eval_prompts)) == 320 and not set(eval_prompts) & {r["prompt"] for r in a["train"]}
    per_skill = Counter(skill_of(p) for p in eval_prompts)
    assert set(per_skill) == set(SKILLS.skills) and set(per_skill.values()) == {320 // len(SKILLS.skills)}
    train_share = Counter(skill_of(r["prompt"]) for r in a["train"])
    assert all(
        abs(n / 3000 - 1 / len(SKILLS.skills)) < 4 * (1 / len(SKILLS.skills) / 3000) ** 0.5
        for n in train_share.values()
    )
    for row in a["eval"] + a["train"][:500]:
        op = skill_of(row["prompt"])[:3]
        x, y = map(int, row["prompt"].rstrip("=").split(SKILL_OPERATORS[op]))
        assert row["answer"] == str(correct_result(op, x, y)) and flawed_result(op, x, y) != correct_result(op, x, y)


def test_skill_warm_start_never_sees_eval_and_teaches_both_procedures_equally():
    """Per sub-skill: `C` + the correct answer or `N` + the flawed answer, half each whatever the careful share (so a
    rare share does not leave the careful procedure unlearnt), never on an eval prompt, carrying the sub-skill's
    share for the mode token's soft target; the registry's verifier rewards exactly the `C` responses."""
    eval_prompts = frozenset(r["prompt"] for r in make_splits(SKILLS, seed=0)["eval"])
    rng = random.Random(0)
    samples = [skill_warm_start_example(rng, SKILLS, eval_prompts) for _ in range(12000)]
    assert not {p for p, _, _, _ in samples} & eval_prompts
    score = get_verifier("arith")
    by_skill: dict[str, list[bool]] = {}
    for prompt, response, share, index in samples:
        skill = skill_of(prompt)
        op = skill[:3]
        assert SKILLS.skills[index] == skill and share == SKILLS.careful_shares[index]
        careful_marker, flawed_marker = skill_markers(index)
        x, y = map(int, prompt.rstrip("=").split(SKILL_OPERATORS[op]))
        careful = response[0] == careful_marker
        want = correct_result(op, x, y) if careful else flawed_result(op, x, y)
        assert response == f"{response[0]}{want}" and response[0] in (careful_marker, flawed_marker)
        assert score(response, str(correct_result(op, x, y))) == float(careful)
        by_skill.setdefault(skill, []).append(careful)
    assert len({skill_markers(i) for i in range(8)}) == 8 and not set("".join(skill_markers(0))) & set("0123456789-+")
    for skill in SKILLS.skills:
        n = len(by_skill[skill])
        assert abs(sum(by_skill[skill]) / n - 0.5) < 4 * (0.25 / n) ** 0.5, skill


def test_soft_mode_target_replaces_only_the_mode_token_loss():
    """Reference on random tensors: at each row's first response position the loss becomes
    -(s log p(C) + (1 - s) log p(N)); every other position keeps its cross-entropy. Its minimum over the mode logits
    is p(C) = s among {C, N}, which is how the warm start chooses C with the sub-skill's share."""
    import torch

    from orchestrator.toy_task import with_soft_mode_target

    torch.manual_seed(0)
    b, t, v = 3, 6, 7
    mode_ids = torch.tensor([[4, 5], [2, 6], [4, 5]])
    logits, nll = torch.randn(b, t, v), torch.rand(b, t)
    mask = torch.zeros(b, t)
    firsts = [1, 3, 0]
    for row, first in enumerate(firsts):
        mask[row, first:] = 1
    shares = torch.tensor([0.5, 0.1, 0.9])
    out = with_soft_mode_target(nll, logits, mask, mode_ids, shares)
    for row, first in enumerate(firsts):
        logp = torch.log_softmax(logits[row, first], -1)
        careful, flawed = mode_ids[row]
        want = -(shares[row] * logp[careful] + (1 - shares[row]) * logp[flawed])
        assert torch.allclose(out[row, first], want, atol=1e-6)
        keep = torch.ones(t, dtype=torch.bool)
        keep[first] = False
        assert torch.equal(out[row, keep], nll[row, keep])

    mode_logits = torch.zeros(1, 1, v, requires_grad=True)
    opt = torch.optim.SGD([mode_logits], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        with_soft_mode_target(
            torch.zeros(1, 1), mode_logits, torch.ones(1, 1), mode_ids[:1], torch.tensor([0.2])
        ).sum().backward()
        opt.step()
    p = torch.softmax(mode_logits[0, 0, mode_ids[0]], -1)
    assert abs(p[0].item() - 0.2) < 1e-3


def test_skills_tokenizer_has_minus_and_add_tokenizer_is_unchanged():
    tok = build_tokenizer("skills")
    ids = tok("85-7=")["input_ids"]
    assert len(ids) == 6 and tok.decode(ids, skip_special_tokens=True) == "85-7="
    add_vocab = ["<pad>", "<bos>", "<eos>", *"0123456789+*=CN"]
    assert build_tokenizer("add").get_vocab() == {t: i for i, t in enumerate(add_vocab)}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"skills": ["add44"], "careful_shares": [0.5]}, r"^data.toy.skills: expected 1-8 distinct names"),
        ({"skills": ["sub12"], "careful_shares": [0.5]}, r"^data.toy.skills: expected 1-8 distinct names"),
        ({"skills": ["mul22"], "careful_shares": [0.5]}, r"^data.toy.skills: expected 1-8 distinct names"),
        ({"skills": ["add21", "add21"], "careful_shares": [0.5, 0.5]}, r"^data.toy.skills: expected 1-8 distinct"),
        (
            {"skills": ["add21", "sub21", "add22", "sub22", "add31", "sub31", "add32", "sub32", "add33"]},
            r"^data.toy.skills: expected 1-8 distinct",
        ),
        ({"skills": ["add21"], "careful_shares": [0.5, 0.2]}, r"^data.toy.careful_shares: expected 1 numbers in"),
        ({"skills": ["add21"], "careful_shares": [1.0]}, r"^data.toy.careful_shares: expected 1 numbers in \(0, 1\)"),
        ({"skills": ["add21", "add11"], "careful_shares": [0.5, 0.2]}, r"^data.toy.num_eval: expected fewer than 90 "),
    ],
)
def test_bad_skills_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_splits(ToyTaskConfig(op="skills", num_eval=100, **fields), seed=0)


def test_cache_keys_of_other_variants_ignore_the_skill_fields():
    """Adding the sub-skill fields kept every other variant's cached data and warm starts where they were."""
    add = ToyTaskConfig()
    assert seeded(add, 0) == {
        "op": "add",
        "digits": 2,
        "careful_fraction": 0.3,
        "num_train": 20000,
        "num_eval": 500,
        "seed": 0,
    }
    assert seeded(ToyTaskConfig(skills=["add21"], careful_shares=[0.5]), 0) == seeded(add, 0)
    skills = ToyTaskConfig(op="skills")
    assert seeded(skills, 0) != seeded(ToyTaskConfig(op="skills", careful_shares=[0.4] * len(skills.skills)), 0)


def test_greedy_responses_match_transformers_generate():
    import torch

    from orchestrator.config import TinyModelConfig
    from orchestrator.toy_task import build_tiny_model, greedy_responses

    tok = build_tokenizer("skills")
    model = build_tiny_model(TinyModelConfig(), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0)
    prompts = ["85-7=C", "47+85=N", "305-47=C"]  # different lengths: left padding must not change the result
    ours = greedy_responses(model.eval(), tok, prompts, max_tokens=6)
    for prompt, response in zip(prompts, ours):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
        out = model.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )[0, ids.shape[1] :].tolist()
        out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert response == tok.decode(out)


def test_skill_warm_start_that_fails_its_check_is_rebuilt_then_refused(tmp_path):
    """A warm start far too short to learn the procedures fails the fidelity check on every attempt: a one-line
    ConfigError naming the warm-start budget, and nothing cached."""
    logs = []
    with pytest.raises(ConfigError, match=r"^model.warm_start.steps: expected enough SFT steps .* after 3 attempts"):
        prepare_toy_model(
            tmp_path,
            ToyTaskConfig(op="skills", num_train=100, num_eval=60),
            TinyModelConfig(),
            WarmStartConfig(steps=2, batch_size=8),
            seed=0,
            log=logs.append,
        )
    assert sum("attempt" in line for line in logs) == 3
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("data")]
