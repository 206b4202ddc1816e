"""The logits-extrapolation sampler (linearity/logits_extrapolation.py) on two tiny random Qwen2 models.

α = 0 and α = 1 must reproduce each model on its own: greedy decoding equal to that model's
`generate(do_sample=False)`, and every sampled token's log-prob equal to the model's own teacher-forced
log-softmax. Other α are checked against logits mixed by hand from teacher-forced forward passes, so the
batched path (left padding, position ids, two KV caches, rows leaving at EOS, one prefill per prompt) is
checked against the plainest possible computation. No Ray, no vLLM: a few seconds in all.
"""

from __future__ import annotations

import math

import pytest
import torch

from linearity.logits_extrapolation import (
    LogitsExtrapolationSampler,
    SamplerConfig,
    alpha_from_steps,
    left_pad,
    mix_logits,
    sample_top_p,
    top_p_filter,
)
from orchestrator.config import TinyModelConfig
from orchestrator.toy_task import build_tiny_model, build_tokenizer

PROMPTS = ["12+45=", "9+1=", "50+50=", "3+7=", "123+456=", "8+8="]  # different lengths: left padding matters


def _random_model(tok, seed: int, std: float = 0.2):
    """A tiny Qwen2 with weights drawn wider than the default init, so greedy outputs differ by prompt and some
    rows emit EOS early (the default 0.02 init gives near-uniform logits and one repeated token)."""
    model = build_tiny_model(TinyModelConfig(), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    tok = build_tokenizer()
    m0, m1 = _random_model(tok, 0), _random_model(tok, 1)
    sampler = LogitsExtrapolationSampler(m0, m1, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    return tok, m0, m1, sampler, prompts


def _teacher_forced_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits predicting each response token, from one unpadded forward pass: [len(response), V]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


# ------------------------------------------------------------------------------------------- pure math


def test_alpha_from_steps():
    assert alpha_from_steps(0, 300, 900) == 3.0
    assert alpha_from_steps(100, 300, 200) == 0.5
    with pytest.raises(ValueError, match="t1 equals t0"):
        alpha_from_steps(5, 5, 10)


def test_mix_logits_endpoints_are_exact():
    l0, l1 = torch.randn(3, 7, dtype=torch.bfloat16), torch.randn(3, 7, dtype=torch.bfloat16)
    assert torch.equal(mix_logits(l0, l1, 0.0), l0.float())
    assert torch.equal(mix_logits(l0, l1, 1.0), l1.float())
    torch.testing.assert_close(mix_logits(l0, l1, 2.5), l0.float() + 2.5 * (l1.float() - l0.float()))
    assert mix_logits(l0, l1, 2.5).dtype == torch.float32


def test_top_p_filter_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    # smallest set reaching top_p: 0.7 → {0.5, 0.3}; 0.85 → {0.5, 0.3, 0.15}; 0.4 → {0.5}
    assert kept(0.7) == [[True, True, False, False], [False, False, True, True]]
    assert kept(0.85) == [[True, True, True, False], [False, True, True, True]]
    assert kept(0.4) == [[True, False, False, False], [False, False, False, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(top_p_filter(logits, 0.7)[0, :2], logits[0, :2])  # kept logits are untouched


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sample_top_p_draws_from_the_whole_vocabulary_rule(top_p):
    """The sampler's fast path (nucleus among the top 2, then top 64 candidates, then a full sort; inverse-CDF
    draw) against the reference rule on the whole vocabulary: a very peaked row (nucleus in the first tier), a
    peaked row (second tier), a flat row (full sort); log-probs equal to log_softmax(top_p_filter(logits)), and
    frequencies over 10000 draws."""
    gen = torch.Generator().manual_seed(0)
    V, draws, flat_draws = 1000, 10000, 200
    rows = torch.randn(3, V, generator=gen) * torch.tensor([[12.0], [4.0], [0.1]])
    logits = torch.cat([rows[:2].repeat_interleave(draws, dim=0), rows[2:].expand(flat_draws, V)])
    tok, logp = sample_top_p(logits, top_p, gen, candidates=(2, 64))
    spans = [(0, draws), (draws, 2 * draws), (2 * draws, 2 * draws + flat_draws)]
    for row, (a, b) in enumerate(spans):
        ref = torch.log_softmax(top_p_filter(logits[a : a + 1], top_p), -1)[0]
        assert torch.isfinite(ref[tok[a:b]]).all(), "a token outside the nucleus was drawn"
        torch.testing.assert_close(logp[a:b], ref[tok[a:b]], atol=1e-4, rtol=0)
        if row < 2:  # the frequencies follow the nucleus (a flat row has too many tokens to check)
            freq = torch.bincount(tok[a:b], minlength=V).float() / draws
            assert 0.5 * (freq - ref.exp()).abs().sum().item() < 0.04
    if top_p < 1:
        nucleus = [int(torch.isfinite(top_p_filter(logits[a : a + 1], top_p)).sum()) for a, _ in spans]
        assert nucleus[0] <= 2 < nucleus[1] <= 64 < nucleus[2], nucleus  # every tier was exercised


def test_left_pad_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos[:, -1].tolist() == [2, 0]  # each row's last real token sits at its own position


def test_bad_config_is_named():
    with pytest.raises(ValueError, match=r"^top_p: expected a number in \(0, 1\], got 0"):
        SamplerConfig(alpha=1.0, top_p=0)
    with pytest.raises(ValueError, match=r"^max_batch_rows: expected an integer >= n \(8\)"):
        SamplerConfig(alpha=1.0, n=8, max_batch_rows=4)


def test_vocabulary_mismatch_is_refused():
    tok, code_tok = build_tokenizer(), build_tokenizer("code")
    with pytest.raises(ValueError, match="^model1: vocabulary size"):
        LogitsExtrapolationSampler(
            _random_model(tok, 0), _random_model(code_tok, 1), [tok.eos_token_id], tok.pad_token_id
        )


# ------------------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("alpha, which", [(0.0, 0), (1.0, 1)])
def test_greedy_at_alpha_0_and_1_equals_each_models_greedy(pair, alpha, which):
    tok, m0, m1, sampler, prompts = pair
    model = (m0, m1)[which]
    out = sampler.generate(prompts, SamplerConfig(alpha=alpha, n=2, temperature=0.0, max_tokens=12))
    assert out.prompt_index == [i for i in range(len(prompts)) for _ in range(2)]
    refs = [
        model.generate(
            torch.tensor([p]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    for j, i in enumerate(out.prompt_index):
        ref = refs[i]
        assert out.response_ids[j] == ref, (alpha, PROMPTS[i])
        assert out.finished[j] == (ref[-1] == tok.eos_token_id)
    assert any(out.finished) and not all(out.finished), "the prompts should exercise both EOS and the length cap"


@pytest.mark.parametrize("alpha, top_p", [(0.0, 1.0), (1.0, 1.0), (2.5, 1.0), (-0.5, 1.0), (1.5, 0.9)])
def test_sampled_logprobs_match_teacher_forced_distribution(pair, alpha, top_p):
    """Every sampled token's log-prob is that of log_softmax(top_p(mix(l0, l1) / T)) computed from plain
    teacher-forced forward passes; at α = 0 that is model 0's own distribution, at α = 1 model 1's."""
    tok, m0, m1, sampler, prompts = pair
    T = 0.7
    out = sampler.generate(prompts, SamplerConfig(alpha=alpha, n=3, temperature=T, top_p=top_p, max_tokens=10, seed=11))
    for i, resp, lps in zip(out.prompt_index, out.response_ids, out.logprobs):
        l0 = _teacher_forced_logits(m0, prompts[i], resp)
        l1 = _teacher_forced_logits(m1, prompts[i], resp)
        if alpha == 0.0:
            ref_logits = l0 / T  # model 0 alone
        elif alpha == 1.0:
            ref_logits = l1 / T  # model 1 alone
        else:
            ref_logits = top_p_filter((l0 + alpha * (l1 - l0)) / T, top_p)
        ref = torch.log_softmax(ref_logits, -1).gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        assert torch.isfinite(ref).all(), "a sampled token lies outside the nucleus"
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)


def test_eos_ends_a_row_and_is_kept(pair):
    tok, _, _, sampler, prompts = pair
    cfg = SamplerConfig(alpha=2.0, n=8, temperature=1.0, top_p=1.0, max_tokens=9, seed=3)
    out = sampler.generate(prompts, cfg)
    eos = tok.eos_token_id
    for resp, done in zip(out.response_ids, out.finished):
        assert eos not in resp[:-1], "nothing is generated after EOS"
        assert done == (resp[-1] == eos)
        assert len(resp) == cfg.max_tokens or done
    assert 0 < sum(out.finished) < len(out.finished)


def test_first_token_frequencies_follow_the_extrapolated_distribution(pair):
    """4000 draws of the first token of one prompt: total variation from softmax(top_p(mix / T)) is small, and
    no token outside the nucleus is ever drawn."""
    tok, m0, m1, sampler, prompts = pair
    alpha, T, top_p, n = 1.5, 1.0, 0.9, 4000
    out = sampler.generate(
        prompts[:1], SamplerConfig(alpha=alpha, n=n, temperature=T, top_p=top_p, max_tokens=1, seed=5, max_batch_rows=n)
    )
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        l0, l1 = m0(ids).logits[0, -1], m1(ids).logits[0, -1]
    probs = torch.softmax(top_p_filter(((l0 + alpha * (l1 - l0)) / T)[None], top_p), -1)[0]
    counts = torch.bincount(torch.tensor([r[0] for r in out.response_ids]), minlength=probs.numel()).float()
    assert counts[probs == 0].sum() == 0
    tv = 0.5 * (counts / n - probs).abs().sum().item()
    assert tv < 0.04, tv  # sampling noise alone: E[TV] ≈ 0.5 Σ sqrt(2 p (1-p) / (π n)) ≈ 0.02 here


def test_seeded_and_independent_of_chunking_for_greedy(pair):
    _, _, _, sampler, prompts = pair
    sampled = SamplerConfig(alpha=3.0, n=4, temperature=0.6, top_p=0.95, max_tokens=8, seed=7)
    a, b = sampler.generate(prompts, sampled), sampler.generate(prompts, sampled)
    assert a.response_ids == b.response_ids and a.logprobs == b.logprobs
    c = sampler.generate(prompts, SamplerConfig(**{**sampled.__dict__, "seed": 8}))
    assert c.response_ids != a.response_ids
    greedy = dict(alpha=3.0, n=1, temperature=0.0, max_tokens=8)
    whole = sampler.generate(prompts, SamplerConfig(**greedy))
    chunked = sampler.generate(prompts, SamplerConfig(**greedy, max_batch_rows=2))  # 3 chunks of 2 prompts
    assert chunked.response_ids == whole.response_ids and chunked.prompt_index == whole.prompt_index
    for x, y in zip(chunked.logprobs, whole.logprobs):
        assert all(math.isclose(u, v, abs_tol=1e-4) for u, v in zip(x, y))  # padding changes fp32 sums
