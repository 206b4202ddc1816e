"""Model and data resolution: the embedded toy default or a real model / dataset, through one code path.

Whatever the source, the rest of the job sees a `save_pretrained`-style model path (or hub id) and two
`datasets.Dataset` splits with `prompt` and `answer` columns, mapped from the configured fields.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import ConfigError, DataConfig, JobConfig
from orchestrator.toy_task import prepare_toy_model, write_toy_dataset


def resolve_model(cfg: JobConfig, log=print) -> str:
    """The model path every component loads: the cached warm-started toy, or `model.path`."""
    m = cfg.model
    if m.source == "path":
        path = os.path.expanduser(m.path)
        looks_local = path.startswith(("/", ".")) or os.path.exists(path)  # else a hub id like "org/name"
        if looks_local and not os.path.isdir(path):
            raise ConfigError(f"model.path: expected an existing directory or a hub id, got {m.path!r}")
        return path
    return str(prepare_toy_model(m.cache_dir, cfg.data.toy, m.tiny, m.warm_start, cfg.seed, log=log))


def load_files(files, what: str):
    """Local data files (jsonl/json, parquet or csv) as one `datasets.Dataset`; errors name `data.<what>`."""
    import datasets

    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise ConfigError(f"data.{what}: expected at least one file, got none")
    for p in paths:
        if not os.path.exists(p):
            raise ConfigError(f"data.{what}: file not found: {p}")
    ext = Path(paths[0]).suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
    if builder is None:
        raise ConfigError(f"data.{what}: expected .jsonl, .json, .parquet or .csv files, got {paths[0]}")
    return datasets.load_dataset(builder, data_files=paths, split="train")


def load_splits(cfg: JobConfig):
    """Returns (train, eval) `datasets.Dataset`s with columns `prompt` and `answer` (strings)."""
    import datasets

    datasets.disable_progress_bars()  # the job has its own progress bar

    d = cfg.data
    if d.source == "toy":
        paths = write_toy_dataset(Path(cfg.model.cache_dir) / "data", d.toy, cfg.seed)
        train, evals = load_files(str(paths["train"]), "train_files"), load_files(str(paths["eval"]), "eval_files")
    elif d.source == "files":
        train, evals = load_files(d.train_files, "train_files"), load_files(d.eval_files, "eval_files")
    else:
        train = datasets.load_dataset(d.hub_id, d.hub_config, split=d.train_split)
        evals = datasets.load_dataset(d.hub_id, d.hub_config, split=d.eval_split)
    return map_fields(train, d, "train"), map_fields(evals, d, "eval")


def map_fields(ds, d: DataConfig, split: str):
    for key in ("prompt_field", "answer_field"):
        name = getattr(d, key)
        if name not in ds.column_names:
            raise ConfigError(
                f"data.{key}: the {split} split has no field {name!r} (fields: {', '.join(ds.column_names)})"
            )
    template, prompt_field, answer_field = d.prompt_template, d.prompt_field, d.answer_field

    def convert(row):
        return {"prompt": template.format(prompt=row[prompt_field]), "answer": str(row[answer_field])}

    return ds.map(convert, remove_columns=ds.column_names)


class PromptEncoder:
    """Turns prompt text into token ids the same way for rollout and learner (chat template optional)."""

    def __init__(self, tokenizer, apply_chat_template: bool, max_prompt_tokens: int):
        self.tok = tokenizer
        self.chat = apply_chat_template
        self.max_len = max_prompt_tokens

    def __call__(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_len:
            raise ConfigError(
                f"data.max_prompt_tokens: expected prompts of at most {self.max_len} tokens, "
                f"got {len(ids)} for {prompt[:60]!r}"
            )
        return ids


@dataclass
class PromptCursor:
    """Deterministic epoch-shuffled walk over the train split; the position is checkpointable."""

    size: int
    seed: int
    position: int = 0  # prompts consumed so far
    # the current epoch's order, shuffled once per epoch (30 ms for 20,000 prompts: every step reshuffled it before)
    _epoch_order: tuple[int, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(self.size))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.size)
            order = self._order(epoch)
            take = min(count - len(out), self.size - offset)
            out.extend(order[offset : offset + take])
            self.position += take
        return out
