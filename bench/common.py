"""Shared helpers for the benchmarks: build models in code, start actors on a local Ray, print the JSON line."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

RESULTS = ROOT / "bench" / "results"
# What a result depends on: the code, not the docs or the results (committing a result does not change the version)
CODE_PATHS = ("orchestrator", "actors", "linearity", "verifiers", "bench", "conf", "pyproject.toml")

# Model shapes built in code (no downloads). "100m" is a ~100M-parameter Qwen2.
SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "100m": dict(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=4, intermediate_size=2304),
}


def build_model_dir(shape: str, out_dir: Path) -> tuple[str, int]:
    """A randomly initialised tied-embedding Qwen2 of the given shape with the toy tokenizer."""
    from orchestrator.config import TinyModelConfig
    from orchestrator.toy_task import build_tiny_model, build_tokenizer

    path = out_dir / f"model-{shape}"
    tok = build_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(**SHAPES[shape]), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seed=0
    )
    n_params = sum(p.numel() for p in model.parameters())
    if not (path / "config.json").exists():
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return str(path), n_params


def run_overrides(name: str, out_dir: str, tracking_uri: str, cache_dir, experiment: str | None = None) -> list[str]:
    """What every benchmark's training run shares: no progress bar, no final checkpoint, an output folder of its own,
    an MLflow run named `name` (in `experiment`, if given) at `tracking_uri`, warm starts from `cache_dir`."""
    return [
        "trainer.progress=false",
        "trainer.save_final=false",
        f"trainer.output_dir={out_dir}/{name}",
        f"tracking.tracking_uri={tracking_uri}",
        *([f"tracking.experiment={experiment}"] if experiment else []),
        f"tracking.run_name={name}",
        f"model.cache_dir={cache_dir}",
    ]


def start_ray(num_cpus: int = 8):
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    return ray


def machine() -> dict:
    """What a result was measured on: the CPU model and its cores (toy runs are bit-reproducible on one CPU model, not
    across them, and speeds differ by ~2x between the 2-core machines these benches ran on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    except OSError:
        cpu = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count()}


def code_version(paths: tuple[str, ...] = CODE_PATHS) -> str:
    """The last commit that touched the code, plus a hash of its uncommitted changes (docs and results don't count:
    committing a result does not orphan the runs that made it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("log", "-1", "--format=%h", "--", *paths).strip()
        dirty = git("diff", "HEAD", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (f"+dirty-{hashlib.sha256(dirty.encode()).hexdigest()[:8]}" if dirty else "")


def emit(result: dict) -> None:
    """The benchmark's result: one JSON object on the last line of stdout, with the code version (unless the bench
    gives its own, e.g. the stored runs') and the machine it was measured on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tags = {"code": result.get("code") or code_version(), "machine": result.get("machine") or machine()}
    print(json.dumps({**result, **tags}), flush=True)
