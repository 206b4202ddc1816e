"""RolloutActor on a real vLLM engine inside a Ray actor: log-probs and weight updates.

Checks against a transformers forward pass on the same weights, on a tied-embedding model (where vLLM's
CPU reload leaves the packed output head stale unless it is re-processed).
"""

from __future__ import annotations

import pytest
import torch

from actors.rollout import RolloutActor, RolloutSpec
from actors.weight_sync import bucket_by_layer, layer_key
from orchestrator.config import RolloutConfig
from orchestrator.messages import SamplingConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rollout(ray_session, toy_model_path):
    from orchestrator.cluster import rollout_actor_env

    actor = (
        ray_session.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": rollout_actor_env(1)})
        .remote(RolloutSpec(toy_model_path, RolloutConfig(kv_cache_mb=16), seed=0))
    )
    yield actor
    ray_session.kill(actor)


@pytest.fixture(scope="module")
def hf(toy_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_path)
    model = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    return tok, model


def _prompts(tok):
    return [tok(p)["input_ids"] for p in ["12+45=", "99+11=", "50+50=", "31+7="]]


def _hf_logprobs(model, prompt_ids, response_ids, temperature=1.0):
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + response_ids])
        logits = model(ids).logits[0].float() / temperature
        logp = torch.log_softmax(logits, -1)
    p = len(prompt_ids)
    return [logp[p - 1 + j, t].item() for j, t in enumerate(response_ids)]


def test_sampled_logprobs_match_transformers(rollout, hf, ray_session):
    tok, model = hf
    for temperature in (1.0, 0.7):
        result = ray_session.get(
            rollout.generate.remote(_prompts(tok), SamplingConfig(n=4, temperature=temperature, max_tokens=6, seed=3))
        )
        assert len(result.response_ids) == 16 and result.prompt_index == [i for i in range(4) for _ in range(4)]
        for pids, rids, lps, text in zip(result.prompt_ids, result.response_ids, result.logprobs, result.response_text):
            assert len(lps) == len(rids) > 0
            # processed log-probs: log_softmax(logits / T), what the PPO ratio needs
            ref = _hf_logprobs(model, pids, rids, temperature)
            assert max(abs(a - b) for a, b in zip(lps, ref)) < 1e-4
            assert text == tok.decode(rids, skip_special_tokens=True)


def test_min_tokens_makes_every_response_that_long(rollout, hf, ray_session):
    """rollout.min_tokens (vLLM masks EOS until then): the toy's answers end after 3-4 tokens; with min_tokens =
    max_tokens every response is exactly max_tokens long (the equal-work setting of bench/vs_trl.py)."""
    tok, _ = hf
    free = ray_session.get(rollout.generate.remote(_prompts(tok), SamplingConfig(n=4, max_tokens=10, seed=3)))
    assert max(len(r) for r in free.response_ids) < 10
    fixed = ray_session.get(
        rollout.generate.remote(_prompts(tok), SamplingConfig(n=4, max_tokens=10, min_tokens=10, seed=3))
    )
    assert [len(r) for r in fixed.response_ids] == [10] * 16


def test_a_seeded_batch_draws_each_prompt_independently_and_reproducibly(rollout, hf, ray_session):
    """vLLM seeds each request with SamplingParams.seed: one seed for a whole batch gave every copy of a prompt the
    same sample. Each prompt now has its own seed (prompt_seed): 64 copies of one prompt, one sample each, draw both
    procedures (the warm start picks C about a third of the time), and the same seeded call repeats exactly."""
    tok, _ = hf
    batch = [tok("58+67=")["input_ids"]] * 64
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=6, seed=11)
    first = ray_session.get(rollout.generate.remote(batch, sampling))
    modes = {text[:1] for text in first.response_text}
    assert {"C", "N"} <= modes, modes
    again = ray_session.get(rollout.generate.remote(batch, sampling))
    assert again.response_ids == first.response_ids
    shifted = ray_session.get(rollout.generate.remote(batch[:2], sampling, [1, 0]))  # positions, as a group passes
    assert shifted.response_ids == [first.response_ids[1], first.response_ids[0]]


def test_a_small_token_budget_prefills_whole_prompts_and_draws_the_same(rollout, hf, ray_session, toy_model_path):
    """A batch whose prompts overflow max_num_batched_tokens: with chunked prefill vLLM rewinds each seeded request's
    generator for the token it discards after a partial prefill, which a CPU generator cannot do (the engine
    stopped: "CPU Generator does not use offset"). CPU engines prefill whole prompts, so a 64-token budget takes the
    batch in more engine steps and draws, prompt by prompt, what the default budget draws."""
    from orchestrator.cluster import rollout_actor_env

    tok, _ = hf
    small = RolloutConfig(kv_cache_mb=16, max_num_seqs=64, max_num_batched_tokens=64)
    narrow = (
        ray_session.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": rollout_actor_env(1)})
        .remote(RolloutSpec(toy_model_path, small, seed=0))
    )
    try:
        batch = [tok(f"{a}+{b}=")["input_ids"] for a, b in zip(range(10, 90, 2), range(90, 10, -2))]
        assert sum(map(len, batch)) > small.max_num_batched_tokens  # the prompts alone take several engine steps
        sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=6, seed=5)
        got = ray_session.get(narrow.generate.remote(batch, sampling))
        want = ray_session.get(rollout.generate.remote(batch, sampling))
        assert len(got.response_ids) == 4 * len(batch)
        assert got.response_ids == want.response_ids
    finally:
        ray_session.kill(narrow)


def test_an_engine_reports_the_sequences_its_kv_cache_holds(rollout, ray_session, toy_model_path, tmp_path):
    """The fixture's 16 MiB hold whole 128-token blocks, one per sequence of max_model_len (64) tokens; the default
    CPU sizing holds max_num_seqs. A job whose largest batch exceeds what an engine holds says so in one line."""
    from types import SimpleNamespace

    from actors.rollout import kv_cache_bytes
    from orchestrator.cluster import rollout_actor_env
    from orchestrator.train import Job
    from tests.helpers import compose_cfg, tiny_job_overrides

    one_sequence = kv_cache_bytes(toy_model_path, RolloutConfig(max_num_seqs=1))
    held = ray_session.get(rollout.kv_capacity.remote())
    assert held == 16 * 2**20 // one_sequence < RolloutConfig().max_num_seqs
    sized = (
        ray_session.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": rollout_actor_env(1)})
        .remote(RolloutSpec(toy_model_path, RolloutConfig(max_num_seqs=300), seed=0))
    )
    try:
        assert ray_session.get(sized.kv_capacity.remote()) >= 300
    finally:
        ray_session.kill(sized)

    def warned(batch_overrides: list[str]) -> list[str]:
        overrides = tiny_job_overrides(str(tmp_path / "cache"), str(tmp_path / "out")) + batch_overrides
        job = Job(compose_cfg(overrides), str(tmp_path / "out"))
        job.groups, job.eval_prompt_ids, lines = SimpleNamespace(rollouts=[rollout]), [[1]] * 8, []
        job.log = lines.append
        job.warn_if_engines_run_in_waves()
        return lines

    assert warned(["trainer.prompts_per_step=16", "trainer.samples_per_prompt=8"]) == []  # 128 sequences fit
    assert warned(["trainer.prompts_per_step=32", "trainer.samples_per_prompt=8"]) == [
        f"warning: the rollout engines' KV cache (rollout.kv_cache_mb=16) holds {int(held)} sequences of "
        "rollout.max_model_len=64 tokens, and an engine is handed 256 at once: it generates them in waves, several "
        "times slower (rollout.kv_cache_mb=null sizes the cache to fit on CPU)"
    ]


def test_prompt_seeds_keep_every_prompts_samples_apart():
    from actors.rollout import SEED_SPACING, prompt_seed

    seeds = [prompt_seed(seed, position) for seed in range(50) for position in range(200)]
    assert all(s % SEED_SPACING == 0 and 0 < s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)  # so seed + i (i < n <= SEED_SPACING) never meets another prompt's


def test_greedy_matches_transformers_argmax(rollout, hf, ray_session):
    tok, model = hf
    prompts = _prompts(tok)
    result = ray_session.get(rollout.generate.remote(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=6)))
    for pids, rids in zip(prompts, result.response_ids):
        out = model.generate(
            torch.tensor([pids]),
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(pids) :].tolist()
        assert rids == out[: len(rids)]


def test_weight_update_changes_outputs_and_bumps_version(rollout, hf, ray_session):
    tok, model = hf
    prompts = _prompts(tok)
    v0 = ray_session.get(rollout.get_weight_version.remote())
    # New weights: perturb every tensor, including the tied embedding (= the output head).
    gen = torch.Generator().manual_seed(0)
    new_state = {
        name: 1.3 * p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()
    }
    buckets = bucket_by_layer(new_state.items(), bucket_mb=1e-6)  # one bucket (one RPC) per layer
    assert len(buckets) > 3
    info = ray_session.get(rollout.update_weights.remote(buckets, v0 + 1))
    assert info["version"] == v0 + 1 and info["tensors"] == len(new_state)

    ref_model = type(model)(model.config).eval()
    ref_model.load_state_dict(new_state, strict=False)
    ref_model.tie_weights()
    result = ray_session.get(
        rollout.generate.remote(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=1))
    )
    assert result.weight_version == v0 + 1
    worst_new, worst_old = 0.0, 0.0
    for pids, rids, lps in zip(result.prompt_ids, result.response_ids, result.logprobs):
        worst_new = max(worst_new, max(abs(a - b) for a, b in zip(lps, _hf_logprobs(ref_model, pids, rids))))
        worst_old = max(worst_old, max(abs(a - b) for a, b in zip(lps, _hf_logprobs(model, pids, rids))))
    assert worst_new < 1e-4, "vLLM does not follow the new weights (stale tied head or prefix cache?)"
    assert worst_old > 1e-3, "the perturbation should have changed the log-probs"

    # and back: the original weights reproduce the original log-probs
    ray_session.get(rollout.update_weights.remote([list((n, p.detach()) for n, p in model.named_parameters())], v0 + 2))
    result = ray_session.get(
        rollout.generate.remote(prompts, SamplingConfig(n=1, temperature=1.0, max_tokens=6, seed=2))
    )
    for pids, rids, lps in zip(result.prompt_ids, result.response_ids, result.logprobs):
        assert max(abs(a - b) for a, b in zip(lps, _hf_logprobs(model, pids, rids))) < 1e-4


def test_buckets_never_split_a_layer():
    names = (
        ["model.embed_tokens.weight"]
        + [
            f"model.layers.{i}.{part}"
            for i in range(3)
            for part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight")
        ]
        + ["model.norm.weight"]
    )
    named = [(n, torch.zeros(1024)) for n in names]  # 4 KiB each
    buckets = bucket_by_layer(named, bucket_mb=4 / 1024)
    assert [n for b in buckets for n, _ in b] == names
    keys_per_bucket = [{layer_key(n) for n, _ in b} for b in buckets]
    for a, b in zip(keys_per_bucket, keys_per_bucket[1:]):
        assert not a & b, "a layer spans two buckets"
    assert len(buckets) == 5  # embed, layer 0, layer 1, layer 2, norm
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
