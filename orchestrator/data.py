"""Model and data resolution: the embedded toy default or a real model / dataset, through one code path, checked
row by row before anything starts.

Whatever the source, the rest of the job sees a checked `save_pretrained`-style model path (or hub id) and two
`datasets.Dataset` splits with `prompt` and `answer` string columns, mapped from the configured fields.

How a split is read (`read_split`), then checked (`Split`), then settled:
- Files: `data.train_files` / `data.eval_files` take a path, a directory (its .jsonl/.json/.parquet/.csv files) or
  a glob, or a list of them; all of one format. Text formats are read here with the standard library, one row at a
  time, so a bad row is named by file and line (`train.jsonl:7`); parquet files (and hub datasets) are loaded by
  `datasets` and named by row (`train.parquet (row 7)`). Why not `datasets`' json / csv builders: they fail on the
  first unparsable line without naming it and infer one type per column (pandas reads the answer `0.50` as 0.5, a
  column of integers with one gap as floats, and a number in a column of strings fails the whole file).
- A row is bad when it cannot be parsed, lacks the prompt or answer field, has it null, empty or of the wrong type
  (a prompt is a string; an answer a string, a number, or JSON tests as a list / object for the code verifier),
  has a prompt longer than `data.max_prompt_tokens` once encoded, or has a reference answer the verifier can never
  give a full score (`verifiers.reference_problem`: each verifier's own check). Every row is checked.
- Bad rows fail the job with one line naming the first (file:line) and their count, unless `data.skip_bad_rows`:
  then they are dropped and counted (`data/skipped_rows_<split>`). Problems with a whole file (no such path, an
  empty file, parquet / csv without the fields, JSON that cannot be read past a point) always fail.
- The checked rows become a `datasets.Dataset` (`Dataset.from_dict`), the job's in-memory data.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cli import first_line
from orchestrator.config import DataConfig, InputError, JobConfig
from orchestrator.models import check_model_dir, is_local
from orchestrator.toy_task import prepare_toy_model, write_toy_dataset

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_MISSING = object()


def resolve_model(cfg, log=print) -> str:
    """The model path every component loads: the cached warm-started toy, or `model.path` (a hub id is passed
    through; a local folder is checked: config, weights — `orchestrator.models.check_model_dir`)."""
    m = cfg.model
    if m.source == "path":
        if not is_local(m.path):
            return m.path
        path = os.path.expanduser(m.path)
    else:
        path = str(prepare_toy_model(m.cache_dir, cfg.data.toy, m.tiny, m.warm_start, cfg.seed, log=log))
    check_model_dir(path)
    return path


# ---------------------------------------------------------------------------------------------------- files


def expand_files(spec, where: str) -> list[Path]:
    """The data files a `*_files` value names (paths, directories, globs; a string or a list), in order; all of
    one format. `where` is the config field, for messages."""
    entries = [spec] if isinstance(spec, str) else list(spec or [])
    if not entries:
        raise InputError(f"{where}: expected a path, directory or glob, found an empty list")
    paths: list[Path] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{where}: expected files matching {entry!r}, found none")
        elif os.path.isdir(entry):
            found = sorted(p for p in Path(entry).iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
            if not found:
                raise InputError(f"{entry}: expected .jsonl, .json, .parquet or .csv files ({where}), found none")
        elif os.path.isfile(entry):
            found = [Path(entry)]
        else:
            raise InputError(f"{entry}: expected a data file, directory or glob ({where}), found no such path")
        paths += found
    for p in paths:
        if p.suffix.lower() not in FORMATS:
            raise InputError(f"{p}: expected a .jsonl, .json, .parquet or .csv file ({where}), found {p.suffix!r}")
    kinds = sorted({FORMATS[p.suffix.lower()] for p in paths})
    if len(kinds) > 1:
        raise InputError(f"{where}: expected files of one format, found {' and '.join(kinds)}")
    return paths


@dataclass
class Record:
    """One row as read: where it is (`path:line`, `path (row n)`), and its fields or why it could not be read."""

    where: str
    fields: object = None  # a dict for a readable row
    problem: str | None = None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected UTF-8 text, found undecodable bytes at byte {e.start}") from None


def _jsonl_records(path: Path, text: str) -> list[Record]:
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            out.append(Record(f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append(Record(f"{path}:{lineno}", problem=f"expected a JSON object, found unparsable JSON ({e.msg})"))
    return out


def _json_records(path: Path, text: str) -> list[Record]:
    """A JSON array of objects, each named by the line it starts on; any other .json is read as JSON lines."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        if text.count("\n", start) > 1 and text.startswith("{", start):
            try:
                json.loads(text)
            except json.JSONDecodeError:
                pass  # JSON lines
            else:
                raise InputError(f"{path}: expected a JSON array of objects or JSON lines, found one JSON object")
        return _jsonl_records(path, text)
    decoder, out, i, line, counted = json.JSONDecoder(), [], start + 1, 1, 0

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        i = skip_space(i)
        if text.startswith("]", i):
            return out
        line, counted = line + text.count("\n", counted, i), i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:  # nothing after this point can be found again: the file fails
            raise InputError(
                f"{path}:{e.lineno}: expected a JSON array of objects, found unparsable JSON ({e.msg})"
            ) from None
        out.append(Record(f"{path}:{line}", value))
        i = skip_space(i)
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            where = line + text.count("\n", counted, i)
            raise InputError(f"{path}:{where}: expected ',' or ']', found {text[i : i + 1]!r}")


def _csv_records(path: Path, d: DataConfig) -> list[Record]:
    with open(path, newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            _require_columns(path, header, d)
            return [Record(f"{path}:{reader.line_num}", row) for row in reader]
        except UnicodeDecodeError:
            raise InputError(f"{path}: expected UTF-8 text, found undecodable bytes") from None
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: expected CSV, found {e}") from None


def _parquet_records(path: Path, d: DataConfig) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train")
    except Exception as e:  # datasets' own wording is the detail
        raise InputError(f"{path}: expected a parquet file, found: {first_line(e)}") from None
    _require_columns(path, ds.column_names, d)
    return _dataset_records(ds, str(path))


def _dataset_records(ds, where: str) -> list[Record]:
    return [Record(f"{where} (row {i + 1})", row) for i, row in enumerate(ds)]


def _require_columns(path, columns, d: DataConfig) -> None:
    missing = [name for name in (d.prompt_field, d.answer_field) if name not in columns]
    if missing:
        raise InputError(
            f"{path}: expected the columns {d.prompt_field!r} and {d.answer_field!r} (data.prompt_field, "
            f"data.answer_field), found {', '.join(map(repr, columns)) or 'none'}"
        )


def read_file(path: Path, d: DataConfig) -> list[Record]:
    """Every row of one data file, in file order (an empty file is an error)."""
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        records = _parquet_records(path, d)
    elif kind == "csv":
        records = _csv_records(path, d)
    else:
        text = _read_text(path)
        records = _json_records(path, text) if kind == "json" else _jsonl_records(path, text)
    if not records:
        raise InputError(f"{path}: expected at least one row, found an empty file")
    return records


# ----------------------------------------------------------------------------------------------------- rows


def _shown(value) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def _field(fields: dict, name: str, config_key: str) -> tuple[object, str | None]:
    value = fields.get(name, _MISSING)
    if value is _MISSING:
        found = ", ".join(map(repr, list(fields)[:8])) or "none"
        return None, f"expected a field {name!r} (data.{config_key}), found fields {found}"
    if value is None:
        return None, f"expected a value for {name!r}, found null"
    return value, None


def to_prompt_answer(fields, d: DataConfig) -> tuple[str, str] | str:
    """(prompt text with the template applied, reference answer as a string) of one row's fields, or the problem.

    An answer may be a string, a finite number (written as Python prints it), or a list / object (JSON, e.g. the
    code verifier's tests); a prompt must be a string."""
    if not isinstance(fields, dict):
        return f"expected a JSON object, found {_shown(fields)}"
    prompt, problem = _field(fields, d.prompt_field, "prompt_field")
    if problem:
        return problem
    answer, problem = _field(fields, d.answer_field, "answer_field")
    if problem:
        return problem
    if not isinstance(prompt, str):
        return f"expected a string {d.prompt_field!r}, found {_shown(prompt)}"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, list, dict)):
        return f"expected a string, number or JSON {d.answer_field!r}, found {_shown(answer)}"
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"expected a finite number {d.answer_field!r}, found {answer}"
    if not isinstance(answer, str):
        answer = json.dumps(answer) if isinstance(answer, (list, dict)) else str(answer)
    for name, value in ((d.prompt_field, prompt), (d.answer_field, answer)):
        if not value.strip():
            return f"expected a non-empty {name!r}, found {value!r}"
    return d.prompt_template.format(prompt=prompt), answer


@dataclass
class Split:
    """One split's rows as read, in order: prompt texts, reference answers, where each row is; and the bad rows
    found so far (row index -> `where: problem`; a bad row's prompt and answer are empty)."""

    name: str  # train | eval
    where: str  # the config field it came from (data.train_files, eval.datasets[1].eval_files, ...)
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)

    def add(self, record: Record, d: DataConfig) -> None:
        pair = record.problem or to_prompt_answer(record.fields, d)
        if isinstance(pair, str):
            self.bad[len(self.places)] = f"{record.where}: {pair}"
            pair = ("", "")
        self.prompts.append(pair[0])
        self.answers.append(pair[1])
        self.places.append(record.where)

    def good(self) -> list[int]:
        return [i for i in range(len(self.places)) if i not in self.bad]

    def check_prompt_lengths(self, encode: PromptEncoder) -> None:
        """Prompts longer than `data.max_prompt_tokens` once encoded (chat template included) are bad rows."""
        rows = self.good()
        for i, n in zip(rows, encode.lengths([self.prompts[i] for i in rows])):
            if n > encode.max_len:
                self.bad[i] = (
                    f"{self.places[i]}: expected a prompt of at most {encode.max_len} tokens "
                    f"(data.max_prompt_tokens), found {n}"
                )

    def check_references(self, verifier: str) -> None:
        """Reference answers the verifier can never give a full score are bad rows."""
        from verifiers import reference_problem

        for i in self.good():
            problem = reference_problem(verifier, self.answers[i])
            if problem:
                self.bad[i] = f"{self.places[i]}: {problem}"

    def settle(self, skip: bool, log=print):
        """The good rows as a `datasets.Dataset` (prompt, answer) and how many were skipped; with bad rows and not
        `skip`, InputError naming the first and the count."""
        import datasets

        total, bad = len(self.places), len(self.bad)
        first = self.bad[min(self.bad)] if self.bad else None
        if bad and not skip:
            raise InputError(
                f"{first} (the first of {bad} bad rows of {total} in {self.where}; data.skip_bad_rows=true skips them)"
            )
        if bad == total:
            raise InputError(f"{self.where}: expected at least one good row, found {total} bad rows (first: {first})")
        if bad:
            log(f"{self.where}: skipped {bad} bad rows of {total} (data.skip_bad_rows; the first: {first})")
        rows = self.good()
        columns = {"prompt": [self.prompts[i] for i in rows], "answer": [self.answers[i] for i in rows]}
        return datasets.Dataset.from_dict(columns), bad


def read_split(d: DataConfig, split: str, cache_dir: str, seed: int, prefix: str = "data") -> Split:
    """Every row of split `split` (train | eval) of data config `d`, fields checked; `prefix` names `d` in
    messages (`data`, `eval.datasets[1]`)."""
    if d.source == "hub":
        import datasets

        name = d.train_split if split == "train" else d.eval_split
        try:
            ds = datasets.load_dataset(d.hub_id, d.hub_config, split=name)
        except Exception as e:  # no network, no such dataset or split: datasets' wording is the detail
            raise InputError(f"{prefix}.hub_id: expected a dataset datasets can load, found: {first_line(e)}") from None
        _require_columns(f"{d.hub_id} ({name})", ds.column_names, d)
        out = Split(split, f"{prefix}.hub_id")
        for record in _dataset_records(ds, f"{d.hub_id} ({name})"):
            out.add(record, d)
        return out
    key = "train_files" if split == "train" else "eval_files"
    if d.source == "toy":
        paths = [write_toy_dataset(Path(cache_dir) / "data", d.toy, seed)[split]]
    else:
        paths = expand_files(getattr(d, key), f"{prefix}.{key}")
    out = Split(split, f"{prefix}.{key}")
    for path in paths:
        for record in read_file(path, d):
            out.add(record, d)
    return out


def check_split(split: Split, d: DataConfig, encode: PromptEncoder | None, log=print):
    """Prompt lengths (when `encode` is given) and reference answers checked, then settled: (Dataset, skipped)."""
    if encode is not None:
        split.check_prompt_lengths(encode)
    split.check_references(d.verifier)
    return split.settle(d.skip_bad_rows, log=log)


@dataclass
class Splits:
    """The job's checked data: the train and eval splits, and how many bad rows each skipped."""

    train: object  # datasets.Dataset with prompt, answer
    eval: object
    skipped: dict[str, int]  # {"data/skipped_rows_train": n, "data/skipped_rows_eval": m}


def load_splits(cfg: JobConfig, encode: PromptEncoder | None, log=print) -> Splits:
    """Both splits of the job's data, read and checked; `encode` None skips the prompt-length check."""
    import datasets

    datasets.disable_progress_bars()  # the job has its own progress bar
    out = {}
    for split in ("train", "eval"):
        rows = read_split(cfg.data, split, cfg.model.cache_dir, cfg.seed)
        out[split] = check_split(rows, cfg.data, encode, log=log)
    return Splits(
        out["train"][0], out["eval"][0], {f"data/skipped_rows_{s}": skipped for s, (_, skipped) in out.items()}
    )


# ------------------------------------------------------------------------------------------------- prompts


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
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts of many prompts (one batched tokenizer call without the chat template)."""
        if self.chat or not prompts:
            return [len(self(p)) for p in prompts]
        return [len(ids) for ids in self.tok(prompts, add_special_tokens=True)["input_ids"]]


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
