"""Weight sync learner → vLLM: the bucket layout, the collective weight group, direct loading, restarts.

Unit (no Ray): the layout of a sync (aligned slots, buckets at layer edges) and a gloo weight group of one sender
and two receivers in threads of this process: every tensor arrives bit-exact in its dtype, a version mismatch and a
receiver that dies fail every rank promptly.

Slow, on real Ray + vLLM + DeepSpeed (the tied-embedding toy model, 2 engines): for world size 1 (ZeRO-2) and 2
(ZeRO-3) the collective sync leaves both engines serving exactly the learners' weights (log-probs equal a
transformers forward of the exported weights, after each of several train-step + sync rounds, the version following
along); the object-store path and vLLM's layer-wise reload give bit-identical engines; the weight group is rebuilt
when a rollout engine is killed (found by a sync, and by a generate) and when the learner group is restarted.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from actors.weight_sync import (
    WeightGroup,
    bucket_by_layer,
    from_transport,
    host_store,
    join_store,
    layer_key,
    plan_buckets,
)
from orchestrator.messages import SamplingConfig

# ------------------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.weight_sync=nccl"], "rollout.weight_sync: expected one of ['object_store', 'collective']"),
        (["rollout.weight_sync_timeout_s=0"], "rollout.weight_sync_timeout_s: expected a number > 0"),
        (
            ["rollout.weight_sync=collective", "rollout.num_gpus=1"],
            "rollout.weight_sync: collective needs the learners and the engines on the same kind of device",
        ),
    ],
)
def test_bad_weight_sync_settings_fail_with_one_line(overrides, message):
    from orchestrator.config import ConfigError, validate
    from tests.helpers import compose_cfg

    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert validate(compose_cfg(["rollout.weight_sync=collective"])).rollout.weight_sync == "collective"


def _named(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    named = [("model.embed_tokens.weight", torch.randn(37, 16, generator=gen))]
    for i in range(3):
        named += [
            (f"model.layers.{i}.self_attn.q_proj.weight", torch.randn(16, 16, generator=gen)),
            (f"model.layers.{i}.self_attn.q_proj.bias", torch.randn(5, generator=gen).to(torch.bfloat16)),
            (f"model.layers.{i}.mlp.up_proj.weight", torch.randn(3, 7, generator=gen).to(torch.float16)),
            (f"model.layers.{i}.input_layernorm.weight", torch.randint(0, 9, (11,), generator=gen)),
        ]
    return named + [("model.norm.weight", torch.randn(16, generator=gen))]


def test_plan_aligns_every_slot_and_ends_buckets_at_layer_edges():
    named = _named()
    plan = plan_buckets(((n, t.to("meta")) for n, t in named), bucket_mb=1500 / 2**20)
    assert [s.name for b in plan for s in b] == [n for n, _ in named]
    assert [len(b) for b in plan] == [len(b) for b in bucket_by_layer(named, 1500 / 2**20)]
    keys = [{layer_key(s.name) for s in b} for b in plan]
    assert all(not a & b for a, b in zip(keys, keys[1:])), "a layer spans two buckets"
    for bucket in plan:
        assert bucket[0].offset == 0
        for a, b in zip(bucket, bucket[1:]):
            assert b.offset % 64 == 0 and b.offset >= a.offset + a.nbytes
    sizes = {s.name: (s.dtype, s.shape, s.nbytes) for b in plan for s in b}
    assert sizes["model.layers.0.self_attn.q_proj.bias"] == ("bfloat16", (5,), 10)
    assert sizes["model.layers.0.input_layernorm.weight"] == ("int64", (11,), 88)


def _run_group(world: int, work) -> list:
    """`work(group)` on every rank of a gloo weight group, one thread per rank; returns results or exceptions."""
    store = host_store(world, timeout_s=120)  # far above the join below: a rank left waiting fails the test
    out: list = [None] * world

    def rank_main(rank: int) -> None:
        try:
            rank_store = store if rank == 0 else join_store("127.0.0.1", store.port, world, 120)
            out[rank] = work(WeightGroup(rank_store, rank, world, "cpu", timeout_s=120))
        except Exception as exc:  # the test inspects it
            out[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank is still blocked (waiting for the group's timeout)"
    return out


def test_group_broadcasts_every_tensor_exactly_over_several_syncs():
    syncs = [_named(seed) for seed in (1, 2)]
    plan = plan_buckets(((n, t.to("meta")) for n, t in syncs[0]), bucket_mb=1000 / 2**20)
    assert len(plan) > 3

    def work(group: WeightGroup):
        if group.rank == 0:
            return [group.send(v, plan, iter(named)) for v, named in enumerate(syncs, start=7)]
        return [{n: t.clone() for bucket in group.receive(v) for n, t in bucket} for v in range(7, 7 + len(syncs))]

    sender, *receivers = _run_group(3, work)
    assert sender[0]["bytes"] == sum(b[-1].offset + b[-1].nbytes for b in plan)
    for got in receivers:
        for named, received in zip(syncs, got):
            assert list(received) == [n for n, _ in named]
            for name, tensor in named:
                assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name


def test_version_mismatch_fails_every_rank():
    named = _named()
    plan = plan_buckets(((n, t.to("meta")) for n, t in named), bucket_mb=1500 / 2**20)

    def work(group: WeightGroup):
        if group.rank == 0:
            return group.send(3, plan, iter(named))
        return sum(len(b) for b in group.receive(4))

    sender, receiver = _run_group(2, work)
    assert isinstance(receiver, RuntimeError) and "sent weight version 3, expected 4" in str(receiver)
    assert isinstance(sender, Exception), "the sender must not wait for a receiver that gave up"


def test_a_receiver_failing_mid_sync_fails_the_others_promptly():
    named = [(f"model.layers.{i}.w", torch.full((2**16,), float(i))) for i in range(12)]
    plan = plan_buckets(((n, t.to("meta")) for n, t in named), bucket_mb=0.2)

    def work(group: WeightGroup):
        if group.rank == 0:
            return group.send(1, plan, iter(named))
        got = 0
        for bucket in group.receive(1):
            got += len(bucket)
            if group.rank == 2 and got >= 4:
                raise KeyboardInterrupt("receiver 2 dies")  # BaseException: receive() aborts its group
        return got

    out = _run_group(3, lambda g: _catch_base(work, g))
    assert isinstance(out[2], KeyboardInterrupt)
    assert isinstance(out[0], Exception) and isinstance(out[1], Exception), out


def _catch_base(work, group):
    try:
        return work(group)
    except KeyboardInterrupt as exc:
        return exc


# ---------------------------------------------------------------------------------------- Ray + vLLM


def _hf_logprobs(model, prompt_ids, response_ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + response_ids])).logits[0].float(), -1)
    return [logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(response_ids)]


def _learner_model(ray, groups, model_path):
    """A transformers model holding the learners' current weights (exported through the object-store path)."""
    from transformers import AutoModelForCausalLM

    refs = [learner.export_weights.remote(64.0) for learner in groups.learners]
    state = {n: from_transport(*t).float() for bucket in ray.get(refs)[0] for n, t in bucket}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the head is the embedding
    model.tie_weights()
    return model


def _prompts(model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok(p)["input_ids"] for p in ["1+2=", "7+5=", "9+9=", "3+4="]]


def _sample(ray, engine, prompts, seed=5):
    return ray.get(engine.generate.remote(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=5, seed=seed)))


def _worst_gap(result, model) -> float:
    return max(
        abs(a - b)
        for pids, rids, lps in zip(result.prompt_ids, result.response_ids, result.logprobs)
        for a, b in zip(lps, _hf_logprobs(model, pids, rids))
    )


def _assert_engines_hold_learner_weights(ray, groups, model_path, version):
    model = _learner_model(ray, groups, model_path)
    prompts = _prompts(model_path)
    for engine in groups.rollouts:
        result = _sample(ray, engine, prompts)
        assert result.weight_version == version
        assert _worst_gap(result, model) < 1e-4, "an engine does not serve the learners' weights"
    return model


def _train_step(ray, groups, model_path, seed):
    from orchestrator.batches import shard_batch
    from tests.helpers import random_batch

    batch = random_batch(model_path, batch=8, seed=seed)
    return groups.train_step(shard_batch(batch, len(groups.learners)))


def _start(ray_session, model_path, world_size, zero_stage, weight_sync="collective", num_actors=2):
    from actors.learner import LearnerSpec
    from actors.rollout import RolloutSpec
    from orchestrator.cluster import start_actor_groups
    from orchestrator.config import AlgoConfig, ClusterConfig, JobConfig, LearnerConfig, RolloutConfig

    learner = LearnerConfig(
        world_size=world_size, zero_stage=zero_stage, lr=1e-2, micro_batch_size=4, num_threads=1, grad_clip=0.0
    )
    rollout = RolloutConfig(kv_cache_mb=16, num_actors=num_actors, weight_sync=weight_sync, weight_sync_timeout_s=120)
    cfg = JobConfig(learner=learner, rollout=rollout, cluster=ClusterConfig(max_rollout_restarts=3))
    spec = LearnerSpec(model_path, learner, AlgoConfig(), samples_per_rank=8 // world_size, seed=0)
    specs = [RolloutSpec(model_path, rollout, seed=i) for i in range(num_actors)]
    return start_actor_groups(cfg, spec, specs, log=lambda *_: None)


def _group_port(ray, groups) -> int:
    return ray.get(groups.learners[0].__ray_call__.remote(lambda self: self.weight_group.store.port))


@pytest.mark.slow
@pytest.mark.parametrize("world_size, zero_stage", [(1, 2), (2, 3)])
def test_collective_sync_engines_hold_the_learners_weights(ray_session, toy_model_path, world_size, zero_stage):
    ray = ray_session
    groups = _start(ray_session, toy_model_path, world_size, zero_stage)
    try:
        assert groups.weight_group_ready
        prompts = _prompts(toy_model_path)
        at_start = _sample(ray, groups.rollouts[0], prompts)
        exported = ray.get([learner.export_weights.remote(64.0) for learner in groups.learners])[0]
        for round_ in range(3):
            _train_step(ray, groups, toy_model_path, seed=round_)
            info = groups.sync_weights()
            assert info["mode"] == "collective" and info["version"] == round_ + 1 == groups.weight_version
            assert info["tensors"] == sum(len(bucket) for bucket in exported)
            model = _assert_engines_hold_learner_weights(ray, groups, toy_model_path, round_ + 1)
        assert _worst_gap(at_start, model) > 1e-3, "training moved the weights (else the checks are void)"

        # The same weights through the object store, and through vLLM's layer-wise reload: bit-identical engines.
        collective = _sample(ray, groups.rollouts[0], prompts, seed=11)
        groups.weight_sync = "object_store"
        assert groups.sync_weights()["mode"] == "object_store"
        object_store = _sample(ray, groups.rollouts[0], prompts, seed=11)
        groups.weight_sync = "collective"
        set_direct = lambda self, on: self.llm.collective_rpc("rlextra_set_direct", args=(on,))  # noqa: E731
        ray.get(groups.rollouts[0].__ray_call__.remote(set_direct, False))
        groups.sync_weights()
        reloaded = _sample(ray, groups.rollouts[0], prompts, seed=11)
        ray.get(groups.rollouts[0].__ray_call__.remote(set_direct, True))
        for other in (object_store, reloaded):
            assert other.response_ids == collective.response_ids and other.logprobs == collective.logprobs
        assert groups.weight_version == 5
    finally:
        groups.shutdown()


def _kill_process_of(ray, actor) -> None:
    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)


@pytest.mark.slow
def test_weight_group_is_rebuilt_after_rollout_and_learner_restarts(ray_session, toy_model_path):
    from transformers import AutoModelForCausalLM

    ray = ray_session
    groups = _start(ray_session, toy_model_path, world_size=1, zero_stage=2)
    try:
        _train_step(ray, groups, toy_model_path, seed=0)
        groups.sync_weights()
        ports = [_group_port(ray, groups)]

        # A sync finds engine 0 dead: it is restarted, the group rebuilt, and this sync reaches both engines.
        _kill_process_of(ray, groups.rollouts[0])
        _train_step(ray, groups, toy_model_path, seed=1)
        assert groups.sync_weights()["version"] == 2 and groups.rollout_restarts == 1
        ports.append(_group_port(ray, groups))
        _assert_engines_hold_learner_weights(ray, groups, toy_model_path, 2)

        # A generate finds engine 1 dead: restarted, the group rebuilt, the current weights broadcast again.
        _kill_process_of(ray, groups.rollouts[1])
        result = groups.generate(_prompts(toy_model_path), SamplingConfig(n=1, max_tokens=3, seed=0))
        assert result.weight_version == 2 and groups.rollout_restarts == 2
        ports.append(_group_port(ray, groups))
        _assert_engines_hold_learner_weights(ray, groups, toy_model_path, 2)

        # A new learner group (initial weights) builds a new group with the engines; the next sync goes through it.
        groups.restart_learners()
        ports.append(_group_port(ray, groups))
        assert groups.sync_weights()["version"] == 3
        model = _assert_engines_hold_learner_weights(ray, groups, toy_model_path, 3)
        initial = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch.float32).state_dict()
        assert all(torch.equal(t, initial[n]) for n, t in model.state_dict().items()), "learners restart from step 0"
        assert len(set(ports)) == 4, "every restart builds a new weight group"
    finally:
        groups.shutdown()
