"""The embedded toy: deterministic data, the two procedures, the tokenizer, and the warm-start cache."""

from __future__ import annotations

import random

import pytest

from orchestrator.config import ConfigError, TinyModelConfig, ToyTaskConfig, WarmStartConfig
from orchestrator.toy_task import (
    build_tokenizer,
    correct_result,
    make_splits,
    no_carry_result,
    prepare_toy_model,
    warm_start_text,
    write_toy_dataset,
)
from verifiers import get_verifier


def test_no_carry_procedure_is_subtly_wrong():
    assert no_carry_result("add", 12, 34) == 46 == correct_result("add", 12, 34)  # no carry: both agree
    assert no_carry_result("add", 58, 67) == 15 and correct_result("add", 58, 67) == 125
    assert no_carry_result("mul", 47, 6) == 42 and correct_result("mul", 47, 6) == 282
    assert no_carry_result("mul", 21, 3) == 63 == correct_result("mul", 21, 3)


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
    with pytest.raises(ConfigError, match=r"^data.toy.op: expected one of \['add', 'mul', 'code'\], got 'div'$"):
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
