"""Helpers shared by several test files: composing the Hydra config, the small jobs' overrides, free ports, and a
learner group on a random batch. Heavy imports (torch, actors) happen inside the helpers that need them."""

from __future__ import annotations

import socket
from pathlib import Path


def compose_cfg(overrides: list[str], config_name: str = "config"):
    """The config `python -m orchestrator.train` (or, with config_name="evaluate", `orchestrator.evaluate`) sees."""
    from orchestrator.config import compose

    return compose(overrides, config_name=config_name)


# ------------------------------------------------------------------------------------------ entry points


def run_cli_batch(work: Path, cases: dict) -> dict:
    """Run every case as `python -m module args` with exactly the environment `env`, all in one interpreter
    (tests/cli_batch.py: each with its own argv, environment, stdout, stderr and exit code; the imports are paid
    once). `cases`: name → a function of the case's own empty folder (for whatever it might write or start) that
    returns (module, args, env). Returns name → (CompletedProcess, the case's folder)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    folders = {name: work / f"case-{i}" for i, name in enumerate(cases)}
    commands = {}
    for name, build in cases.items():
        folders[name].mkdir(parents=True)
        commands[name] = build(folders[name])
    specs = [{"module": m, "args": [str(a) for a in args], "env": env} for m, args, env in commands.values()]
    (work / "cases.json").write_text(json.dumps(specs))
    subprocess.run(
        [sys.executable, str(root / "tests" / "cli_batch.py"), str(work / "cases.json"), str(work / "results.json")],
        cwd=root,
        check=True,
        timeout=900,
    )
    results = json.loads((work / "results.json").read_text())
    return {
        name: (subprocess.CompletedProcess([module, *args], r["returncode"], r["stdout"], r["stderr"]), folders[name])
        for (name, (module, args, _)), r in zip(commands.items(), results, strict=True)
    }


# ------------------------------------------------------------------------------------------------ jobs


def tiny_job_overrides(cache_dir, out_dir, steps=2) -> list[str]:
    """The tests' small job (the same model and data as tests/conftest.py's `toy_model_path`)."""
    return [
        f"model.cache_dir={cache_dir}",
        "model.warm_start.steps=120",
        "model.warm_start.batch_size=64",
        "data.toy.num_train=2000",
        "data.toy.num_eval=40",
        "data.toy.digits=1",
        "schedule=rl",
        f"trainer.total_steps={steps}",
        "trainer.prompts_per_step=8",
        "trainer.samples_per_prompt=4",
        "trainer.eval_every=0",
        "trainer.eval_prompts=8",
        "trainer.eval_samples=2",
        "trainer.progress=false",
        "trainer.save_final=false",
        f"trainer.output_dir={out_dir}",
        "learner.micro_batch_size=16",
        "rollout.kv_cache_mb=16",
        "reward.num_workers=1",
        f"tracking.tracking_uri=sqlite:///{Path(out_dir) / 'mlflow.db'}",
        "tracking.experiment=test-cluster",
    ]


def small_job_overrides(cache_dir, tmp_path, steps=3) -> list[str]:
    """A short job with periodic evaluation and the final checkpoint, writing under `tmp_path/out`."""
    return [
        f"model.cache_dir={cache_dir}",
        "model.warm_start.steps=120",
        "model.warm_start.batch_size=64",
        "data.toy.num_train=2000",
        "data.toy.num_eval=40",
        "data.toy.digits=1",
        f"trainer.total_steps={steps}",
        "trainer.prompts_per_step=8",
        "trainer.samples_per_prompt=4",
        "trainer.eval_every=2",
        "trainer.eval_prompts=16",
        "trainer.eval_samples=2",
        "trainer.progress=false",
        f"trainer.output_dir={tmp_path / 'out'}",
        "learner.micro_batch_size=16",
        "rollout.kv_cache_mb=16",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=test-job",
    ]


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now (all held open until every one is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------- learners


def random_batch(model_path: str, batch: int = 16, seed: int = 0):
    """A TrainBatch of random prompts and responses (varied lengths, left-padded prompts) with random advantages;
    `old_logp` is zero (see `behaviour_logp`)."""
    import torch
    from transformers import AutoTokenizer

    from orchestrator.messages import TrainBatch

    tok = AutoTokenizer.from_pretrained(model_path)
    gen = torch.Generator().manual_seed(seed)
    P, R = 6, 5
    prompts = torch.full((batch, P), tok.pad_token_id, dtype=torch.long)
    responses = torch.full((batch, R), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((batch, P + R), dtype=torch.long)
    rmask = torch.zeros((batch, R))
    for i in range(batch):
        p_len = int(torch.randint(3, P + 1, (1,), generator=gen))
        r_len = int(torch.randint(1, R + 1, (1,), generator=gen))
        prompts[i, P - p_len :] = torch.randint(3, len(tok), (p_len,), generator=gen)
        responses[i, :r_len] = torch.randint(3, len(tok), (r_len,), generator=gen)
        attn[i, P - p_len : P + r_len] = 1
        rmask[i, :r_len] = 1
    adv = torch.randn(batch, 1, generator=gen).expand(batch, R) * rmask
    old_logp = torch.zeros(batch, R)  # filled from the model by behaviour_logp
    return TrainBatch(prompts, responses, attn, rmask, old_logp, adv.contiguous(), temperature=0.9)


def behaviour_logp(model_path: str, batch):
    """Behaviour log-probs slightly off the current policy, so ratios differ from 1 and some clip."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.learner import forward_response_logits, response_logits_to_logp

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp, _ = response_logits_to_logp(forward_response_logits(model, batch), batch.responses, batch.temperature)
    gen = torch.Generator().manual_seed(1)
    return ((logp + 0.3 * torch.randn(logp.shape, generator=gen)) * batch.response_mask).contiguous()


def start_learner_group(ray, spec):
    """`spec.learner.world_size` LearnerActor ranks on this node, set up (one CPU each)."""
    from actors.learner import LearnerActor
    from orchestrator.cluster import free_port, learner_actor_env

    port = free_port()
    Remote = ray.remote(LearnerActor).options(num_cpus=1, runtime_env={"env_vars": learner_actor_env(1)})
    actors = [Remote.remote(spec, rank, "127.0.0.1", port) for rank in range(spec.learner.world_size)]
    ray.get([a.setup.remote() for a in actors])
    return actors


def stop_learner_group(ray, actors) -> None:
    ray.get([a.shutdown.remote() for a in actors], timeout=60)
    for a in actors:
        ray.kill(a)
