"""Rollout engine tokens/s against its OpenMP threads and wait policy: the in-process vLLM engine of a RolloutActor.

Each setting is an engine in its own Ray actor process (OpenMP reads OMP_NUM_THREADS and OMP_WAIT_POLICY once, at
start), started with the actor environment the job uses (`orchestrator.cluster.rollout_actor_env`) but the setting.
Settings run in the order A B C C B A (drift in the machine's load hits each alike); each takes one warm-up call
and `--repeats` timed calls of the job's batch (32 prompts x 8 samples, <= 32 tokens) on the 15M-parameter model
of bench/vs_trl.py; tokens/s counts generated tokens over the call's wall time (Ray round trip included).

    python bench/engine_threads.py [--repeats 3] [--settings 1,2,2p]

Settings: `N` = OMP_NUM_THREADS=N with libgomp's default wait (a worker spins ~300k iterations after each parallel
region before sleeping); `Np` = the same with OMP_WAIT_POLICY=PASSIVE, the job's actor default (workers sleep at once).
Headline: median tokens/s of the best setting ÷ that of 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets up sys.path and env)
from common import emit, start_ray

SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=512)


def model_dir(out: Path) -> str:
    from orchestrator.config import TinyModelConfig
    from orchestrator.toy_task import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(**SHAPE), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed=0
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def setting_env(setting: str) -> dict:
    from orchestrator.cluster import rollout_actor_env

    env = rollout_actor_env(int(setting.rstrip("p")))
    if not setting.endswith("p"):
        env.pop("OMP_WAIT_POLICY")  # libgomp's default
    return env


def measure(ray, model_path: str, setting: str, prompt_ids, repeats: int) -> list[float]:
    from actors.rollout import RolloutActor, RolloutSpec
    from orchestrator.config import RolloutConfig
    from orchestrator.messages import SamplingConfig

    actor = (
        ray.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": setting_env(setting)})
        .remote(RolloutSpec(model_path, RolloutConfig(), seed=0))
    )
    try:
        ray.get(actor.generate.remote(prompt_ids, SamplingConfig(n=8, max_tokens=32, seed=0)))  # warm-up
        rates = []
        for r in range(repeats):
            start = time.perf_counter()
            res = ray.get(actor.generate.remote(prompt_ids, SamplingConfig(n=8, max_tokens=32, seed=r + 1)))
            rates.append(sum(len(x) for x in res.response_ids) / (time.perf_counter() - start))
        return rates
    finally:
        ray.kill(actor)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", default="1,2,2p")
    args = ap.parse_args()
    settings = args.settings.split(",")

    from orchestrator.config import ToyTaskConfig
    from orchestrator.toy_task import build_tokenizer, make_splits

    tok = build_tokenizer()
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in make_splits(ToyTaskConfig(num_eval=32), seed=0)["eval"]]
    rates: dict[str, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp) / "model-15m")
        ray = start_ray()
        try:
            for setting in settings + settings[::-1]:
                got = measure(ray, path, setting, prompt_ids, args.repeats)
                print(f"{setting}: {[round(x) for x in got]} tokens/s", flush=True)
                rates[setting] += got
        finally:
            ray.shutdown()
    medians = {s: statistics.median(v) for s, v in rates.items()}
    best = max(medians, key=medians.get)
    emit(
        {
            "metric": "engine_tokens_per_s_best_over_1_thread",
            "value": round(medians[best] / medians[settings[0]], 3),
            "goal": None,
            "best": best,
            "tokens_per_s_median": {s: round(v, 1) for s, v in medians.items()},
            "tokens_per_s_all": {s: [round(x, 1) for x in v] for s, v in rates.items()},
            "order": settings + settings[::-1],
        }
    )


if __name__ == "__main__":
    main()
