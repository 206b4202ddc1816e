"""Offline weight extrapolation between two Hugging Face checkpoints (paper §4.2.2).

Given checkpoints at RL steps ``t0 < t1``, predict the weights at a later step ``t′``:

    W_t′ = W_t0 + β (W_t1 − W_t0),        β = (t′ − t0) / (t1 − t0)

(β > 1 extrapolates, 0 < β < 1 interpolates, β = 1 reproduces t1). Tensors that the selection rules exclude
— by default the norm layers, which the paper finds non-linear — are copied from t1 unchanged.

Example
-------

Predict step 900 from the checkpoints at steps 0 and 300 (β = 3), projecting every tensor but the norms::

    python -m orchestrator.extrapolate \\
        --t0-path checkpoints/rl_step_0/hf --t0 0 \\
        --t1-path checkpoints/rl_step_300/hf --t1 300 \\
        --target 900 --out checkpoints/extrapolated_900

or with an explicit coefficient and custom selection (globs on the full tensor name; giving ``--exclude``
*replaces* the default list, so keep ``'*norm*'`` in it to keep norms out; a bare ``--exclude`` excludes
nothing)::

    python -m orchestrator.extrapolate --t0-path A --t1-path B --beta 2.5 --out C \\
        --include 'model.layers.*' 'lm_head.*' --exclude '*norm*' '*.bias'

The output directory is a regular HF checkpoint: ``config.json``, ``generation_config.json`` (if t1 has one),
t1's tokenizer files, the weights as ``model.safetensors`` or — when t1 is sharded — shards with the same
file names and tensor placement plus ``model.safetensors.index.json``, and ``extrapolation_log.json``
(β, t0 / t1 / target, the selection patterns, which tensors were projected and which copied from t1, and per
tensor ``‖W_t1 − W_t0‖``, ``‖W_t0‖`` and their ratio). ``AutoModelForCausalLM.from_pretrained(out)`` loads it.

How it works
------------

- **Streaming.** Tensors are read one at a time with ``safetensors.safe_open`` from both inputs and written
  straight into the output file: the output safetensors header is built up front from t1's header (dtypes
  and shapes do not change), then each tensor's bytes are appended as soon as it is computed. At most one
  tensor of each input (plus its fp32 working copy) is alive at a time; no output shard is buffered. Peak
  memory is therefore a few times the largest tensor, independent of the model size.
- **Numerics.** Each projected tensor is upcast to fp32 (fp64 stays fp64) and moved with
  ``linearity.projection.project_`` — the exact kernel the in-loop RL-Extra extrapolator uses — then cast once
  back to t1's stored dtype. Copied tensors are t1's bytes, bit for bit. Non-floating tensors are copied.
- **Layout.** Tensor names and shapes must agree between t0 and t1 (their shardings may differ); the output
  follows t1's sharding. Tied embeddings need nothing special: a tensor absent from the files stays absent.
- **Safety.** Every argument and input file is checked before anything is written; the output is built in a
  hidden temporary sibling directory and renamed into place at the end, so a failed or interrupted run
  leaves nothing half-written. A non-empty ``--out`` is refused unless ``--overwrite``.

Errors are one line on stderr, ``error: <argument or file>: ...``, with exit code 2 (``HYDRA_FULL_ERROR=1``: a
traceback), as for every entry point (orchestrator/cli.py). The same work is available as a function,
:func:`extrapolate_checkpoint`, which raises :class:`ExtrapolationError` instead.
Importing this module and validating arguments does not import torch (errors come back in well under a
second); torch is only loaded to compute.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linearity.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, TensorSelector
from orchestrator.checkpoints import (
    SAFE_WEIGHTS_INDEX_NAME,
    SafetensorsCheckpoint,
    SafetensorsError,
    TensorEntry,
    read_safetensors_checkpoint,
)
from orchestrator.cli import OneLineArgumentParser, report_errors
from orchestrator.config import InputError
from orchestrator.models import read_model_config

__all__ = ["ExtrapolationError", "beta_from_steps", "extrapolate_checkpoint", "main"]

LOG_NAME = "extrapolation_log.json"
LOG_FORMAT_VERSION = 1

# Non-weight files copied from t1 (top-level files whose names match one of these globs).
AUX_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",  # remote code referenced by config.json's auto_map
)

# safetensors dtype codes this tool projects (others — integers, bool, fp8, packed types — are copied).
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_COPY_CHUNK_BYTES = 16 * 1024 * 1024


class ExtrapolationError(ValueError):
    """A bad argument or input; the message is one line and starts with the argument it is about."""


def _fail(msg: str) -> ExtrapolationError:
    return ExtrapolationError(" ".join(msg.split()))  # guarantee one line


def beta_from_steps(t0: float, t1: float, target: float) -> float:
    """β = (target − t0) / (t1 − t0); raises :class:`ExtrapolationError` when t1 == t0."""
    if t1 == t0:
        raise _fail(f"--t1: equals --t0 ({t0}), so β = (target − t0)/(t1 − t0) is undefined; pass --beta instead")
    return (target - t0) / (t1 - t0)


# ------------------------------------------------------------------------------------------ reading inputs


def _read_checkpoint(path: str | os.PathLike, flag: str) -> SafetensorsCheckpoint:
    p = Path(path)
    if not p.exists():
        raise _fail(f"{flag} {p}: no such directory")
    if not p.is_dir():
        raise _fail(f"{flag} {p}: not a directory")
    try:
        return read_safetensors_checkpoint(p)
    except SafetensorsError as e:  # "--t0-path DIR: …" about the directory, "--t0-path: FILE: …" about a file in it
        raise _fail(f"{flag} {e}" if e.path == p else f"{flag}: {e}") from None


def _names_preview(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _check_compatible(c0: SafetensorsCheckpoint, c1: SafetensorsCheckpoint) -> None:
    n0, n1 = set(c0.tensors), set(c1.tensors)
    if n0 != n1:
        only0, only1 = sorted(n0 - n1), sorted(n1 - n0)
        parts = []
        if only0:
            parts.append(f"only in t0: {_names_preview(only0)}")
        if only1:
            parts.append(f"only in t1: {_names_preview(only1)}")
        raise _fail(f"--t0-path/--t1-path: tensor names differ between the checkpoints; {'; '.join(parts)}")
    for name in sorted(n1):
        i0, i1 = c0.tensors[name], c1.tensors[name]
        if i0.shape != i1.shape:
            raise _fail(
                f"--t0-path/--t1-path: tensor {name!r} has shape {list(i0.shape)} in t0 but {list(i1.shape)} in t1"
            )
        if (i0.dtype in _FLOAT_DTYPES) != (i1.dtype in _FLOAT_DTYPES):
            raise _fail(f"--t0-path/--t1-path: tensor {name!r} has dtype {i0.dtype} in t0 but {i1.dtype} in t1")


def _check_out(out: Path, inputs: list[tuple[str, Path]], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out}: exists and is not a directory")
    ro = out.resolve()
    for flag, p in inputs:
        rp = p.resolve()
        if ro == rp:
            raise _fail(f"--out {out}: is the same directory as {flag}")
        if rp in ro.parents:
            raise _fail(f"--out {out}: lies inside {flag} {p}")
        if ro in rp.parents:
            raise _fail(f"--out {out}: contains {flag} {p} (it would be replaced)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _fail(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise _fail(f"--out {out}: parent {parent} is not a directory")


def _aux_files(ckpt: Path) -> list[str]:
    names = []
    for entry in sorted(ckpt.iterdir()):
        if not entry.is_file() or entry.name.endswith(".safetensors") or entry.name == SAFE_WEIGHTS_INDEX_NAME:
            continue
        if any(fnmatch.fnmatchcase(entry.name, pat) for pat in AUX_FILE_PATTERNS):
            names.append(entry.name)
    return names


# --------------------------------------------------------------------------------------- writing outputs


class _StreamingSafetensorsWriter:
    """Writes a safetensors file whose header is known in advance, one tensor at a time (no buffering).

    Format: 8-byte little-endian header length, a JSON header (padded with spaces to a multiple of 8 bytes,
    as the reference writer does) mapping each name to dtype, shape and ``[begin, end)`` byte offsets into the
    data section, then the tensors' little-endian bytes back to back in header order.
    """

    def __init__(self, path: Path, entries: list[tuple[str, TensorEntry]], metadata: dict[str, str] | None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = metadata
        off = 0
        self._expected: list[tuple[str, int]] = []
        for name, info in entries:
            header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [off, off + info.nbytes]}
            self._expected.append((name, info.nbytes))
            off += info.nbytes
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self.total_bytes = off
        self._pos = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def _next(self, name: str, nbytes: int) -> None:
        exp_name, exp_bytes = self._expected[self._pos]
        if name != exp_name or nbytes != exp_bytes:  # an internal invariant, not a user error
            raise RuntimeError(f"writer expected {exp_name!r} ({exp_bytes} B), got {name!r} ({nbytes} B)")
        self._pos += 1

    def write_tensor(self, name: str, t) -> None:
        import torch

        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._next(name, data.nbytes)
        self._f.write(memoryview(data))

    def copy_bytes(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        self._next(name, nbytes)
        with open(src, "rb") as f:
            f.seek(offset)
            left = nbytes
            while left:
                chunk = f.read(min(left, _COPY_CHUNK_BYTES))
                if not chunk:
                    raise RuntimeError(f"{src}: unexpected end of file")
                self._f.write(chunk)
                left -= len(chunk)

    def close(self) -> None:
        if self._pos != len(self._expected):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._expected)} tensors")
        self._f.close()

    def abort(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------------------------ the API


def extrapolate_checkpoint(
    t0_path: str | os.PathLike,
    t1_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    beta: float,
    selector: TensorSelector | None = None,
    t0_step: float | None = None,
    t1_step: float | None = None,
    target_step: float | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``W_t0 + β (W_t1 − W_t0)`` for the selected tensors (t1's values for the rest) as an HF checkpoint.

    Args:
        t0_path, t1_path: ``save_pretrained`` directories (``model.safetensors`` or a sharded index) with the
            same tensor names and shapes. t1 also provides config, generation config and tokenizer files.
        out: the output directory (created; must be absent or empty unless ``overwrite``).
        beta: the extrapolation coefficient (finite). See :func:`beta_from_steps`.
        selector: which tensors are projected (default ``TensorSelector()``: all but norm layers).
        t0_step, t1_step, target_step: the steps, recorded in the log only (``target_step`` defaults to
            ``t0 + β (t1 − t0)`` when both steps are given).
        overwrite: replace a non-empty ``out`` (only after the new checkpoint is complete).
        echo: called with warnings (e.g. non-finite results); default: print to stderr.

    Returns:
        The log dict, also written to ``out/extrapolation_log.json``.

    Raises:
        ExtrapolationError: a one-line message naming the argument (``--t0-path``, ``--out``, ...) for bad
            inputs; raised before anything is written.
    """
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    selector = selector if selector is not None else TensorSelector()
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise _fail(f"--beta: expected a number, got {beta!r}") from None
    if not math.isfinite(beta):
        raise _fail(f"--beta: must be finite, got {beta}")
    c0 = _read_checkpoint(t0_path, "--t0-path")
    c1 = _read_checkpoint(t1_path, "--t1-path")
    try:  # the output's config is t1's: it must be one
        read_model_config(c1.path)
    except InputError as e:
        raise _fail(f"--t1-path {e}") from None
    _check_compatible(c0, c1)
    out = Path(out)
    _check_out(out, [("--t0-path", c0.path), ("--t1-path", c1.path)], overwrite)
    if c0.path.resolve() == c1.path.resolve():
        echo("warning: --t0-path and --t1-path are the same directory; the displacement is zero")
    if target_step is None and t0_step is not None and t1_step is not None:
        target_step = t0_step + beta * (t1_step - t0_step)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        log = _write_checkpoint(c0, c1, tmp, beta, selector, echo)
        log.update(
            {
                "format_version": LOG_FORMAT_VERSION,
                "beta": beta,
                "t0": t0_step,
                "t1": t1_step,
                "target": target_step,
                "t0_path": str(c0.path.resolve()),
                "t1_path": str(c1.path.resolve()),
                "out": str(out.resolve()),
                "selection": selector.to_dict(),
            }
        )
        log = {k: log[k] for k in _LOG_ORDER if k in log} | log
        (tmp / LOG_NAME).write_text(json.dumps(log, indent=2, allow_nan=False) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return log


_LOG_ORDER = (
    "format_version", "beta", "t0", "t1", "target", "t0_path", "t1_path", "out", "selection", "compute_dtype",
    "totals", "projected", "copied", "tensors", "files", "seconds",
)  # fmt: skip


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is set aside first and removed last."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_checkpoint(
    c0: SafetensorsCheckpoint, c1: SafetensorsCheckpoint, dst: Path, beta: float, selector: TensorSelector, echo
) -> dict[str, Any]:
    import safetensors  # looked up at call time, so tests can wrap safetensors.safe_open
    import torch

    from linearity.projection import compute_dtype, displacement_stats, project_, sq_norm

    started = time.perf_counter()
    tensors_log: dict[str, dict[str, Any]] = {}
    projected, copied, nonfinite = [], [], []
    sq = {"projected": 0.0, "copied": 0.0}
    numel = {"projected": 0, "copied": 0}
    handles: dict[Path, Any] = {}

    def handle(file: Path):
        if file not in handles:
            handles[file] = safetensors.safe_open(str(file), framework="pt", device="cpu")
        return handles[file]

    def project_one(name: str, info: TensorEntry, writer: _StreamingSafetensorsWriter, fname: str) -> None:
        # Every input tensor is a local of this function: it is released when the function returns, so at
        # most one tensor per input checkpoint is alive at any time.
        info0 = c0.tensors[name]
        a = handle(info0.file).get_tensor(name)
        w = handle(info.file).get_tensor(name)
        entry: dict[str, Any] = {"shape": list(info.shape), "dtype": info.dtype, "shard": fname}
        if info0.dtype != info.dtype:
            entry["t0_dtype"] = info0.dtype
        d2 = float(displacement_stats(w, a).total)  # ‖W_t1 − W_t0‖², chunked, fp32 differences, fp64 sums
        n2 = float(sq_norm(a)[0])  # ‖W_t0‖²
        entry["displacement_norm"] = _finite(math.sqrt(d2))  # None when t0 or t1 holds NaN/inf
        entry["t0_norm"] = _finite(math.sqrt(n2))
        entry["relative_displacement"] = _finite(math.sqrt(d2 / n2)) if n2 > 0 else (0.0 if d2 == 0 else None)
        kind = "projected" if selector.selected(name) else "copied"
        if kind == "projected":
            cdt = compute_dtype(torch.promote_types(a.dtype, w.dtype))
            w_c = w.to(cdt, copy=True)  # W_t1, the weights being moved
            a_c = a.to(cdt)  # the anchor W_t0 (no copy when already in cdt)
            project_(w_c, a_c, beta)  # the in-loop kernel: W ← A + β (W − A)
            del a_c
            result = w_c.to(w.dtype)
            if not bool(torch.isfinite(result).all()):
                bad = int((~torch.isfinite(result)).sum())
                entry["nonfinite"] = bad
                nonfinite.append(name)
            writer.write_tensor(name, result)
            projected.append(name)
        else:
            entry["reason"] = "excluded"
            writer.write_tensor(name, w)  # t1's values, bit for bit
            copied.append(name)
        entry["action"] = kind
        sq[kind] += d2
        numel[kind] += w.numel()
        tensors_log[name] = entry

    weight_files = []
    try:
        for fname, shard in c1.files.items():
            entries = list(shard.tensors.items())
            writer = _StreamingSafetensorsWriter(dst / fname, entries, shard.metadata or {"format": "pt"})
            try:
                for name, info in entries:
                    if info.dtype in _FLOAT_DTYPES and c0.tensors[name].dtype in _FLOAT_DTYPES:
                        project_one(name, info, writer, fname)
                    else:  # integer / bool / fp8 / packed: raw bytes from t1
                        writer.copy_bytes(name, shard.path, info.offset, info.nbytes)
                        tensors_log[name] = {
                            "shape": list(info.shape), "dtype": info.dtype, "shard": fname, "action": "copied",
                            "reason": f"dtype {info.dtype} is not projected",
                        }  # fmt: skip
                        copied.append(name)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            weight_files.append(fname)
    finally:
        handles.clear()

    if c1.sharded:
        total = sum(t.nbytes for t in c1.tensors.values())
        index = {
            "metadata": {**c1.index_metadata, "total_size": total},
            "weight_map": {name: c1.tensors[name].file.name for name in sorted(c1.tensors)},
        }
        (dst / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    aux = _aux_files(c1.path)
    for fname in aux:
        shutil.copy2(c1.path / fname, dst / fname)
    if nonfinite:
        echo(f"warning: {len(nonfinite)} projected tensor(s) contain NaN/inf, e.g. {_names_preview(nonfinite, 2)}")
    if not projected:
        echo("warning: no tensor was selected for projection; the output equals t1")

    return {
        "compute_dtype": "float32 (float64 for F64 tensors)",
        "totals": {
            "num_tensors": len(tensors_log),
            "num_projected": len(projected),
            "num_copied": len(copied),
            "params_projected": numel["projected"],
            "params_copied": numel["copied"],
            "projected_displacement_norm": _finite(math.sqrt(sq["projected"])),
            "copied_displacement_norm": _finite(math.sqrt(sq["copied"])),
            "nonfinite_tensors": nonfinite,
        },
        "projected": projected,
        "copied": copied,
        "tensors": tensors_log,
        "files": {
            "weights": weight_files + ([SAFE_WEIGHTS_INDEX_NAME] if c1.sharded else []),
            "copied_from_t1": aux,
        },
        "seconds": round(time.perf_counter() - started, 3),
    }


def _fmt(x: float | None) -> str:
    return "nan/inf" if x is None else f"{x:.4g}"


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: non-finite statistics are logged as null."""
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------- the CLI


def _build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m orchestrator.extrapolate",
        description="Offline weight extrapolation W' = W_t0 + β (W_t1 − W_t0) between two HF checkpoints "
        "(streamed tensor by tensor; norm layers copied from t1 by default).",
    )
    p.add_argument("--t0-path", required=True, help="earlier checkpoint directory (save_pretrained, safetensors)")
    p.add_argument(
        "--t1-path", required=True, help="later checkpoint directory; also the source of config and tokenizer"
    )
    p.add_argument("--out", required=True, help="output checkpoint directory (must be absent or empty)")
    p.add_argument("--t0", type=int, help="RL step of --t0-path")
    p.add_argument("--t1", type=int, help="RL step of --t1-path")
    g = p.add_argument_group("coefficient (exactly one)")
    g.add_argument("--target", type=int, help="target step t'; β = (t' − t0)/(t1 − t0) (needs --t0 and --t1)")
    g.add_argument("--beta", type=float, help="explicit coefficient β (>1 extrapolates)")
    s = p.add_argument_group("selection (globs on the full tensor name; fnmatch syntax: * ? [abc])")
    s.add_argument(
        "--include", nargs="*", metavar="GLOB", help=f"project only matching tensors (default: {list(DEFAULT_INCLUDE)})"
    )
    s.add_argument(
        "--exclude", nargs="*", metavar="GLOB",
        help=f"copy matching tensors from t1 instead; replaces the default {list(DEFAULT_EXCLUDE)} "
        "(a bare --exclude excludes nothing)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out once the new checkpoint is complete"
    )
    return p


def _resolve_beta(args: argparse.Namespace) -> tuple[float, float | None]:
    if args.target is not None and args.beta is not None:
        raise _fail("--target/--beta: give exactly one of them, not both")
    if args.target is None and args.beta is None:
        raise _fail("--target/--beta: give exactly one of them (--target with --t0 and --t1, or --beta)")
    if args.target is not None:
        missing = [f for f, v in (("--t0", args.t0), ("--t1", args.t1)) if v is None]
        if missing:
            raise _fail(f"--target: needs {' and '.join(missing)} (the steps of the two checkpoints)")
        return beta_from_steps(args.t0, args.t1, args.target), args.target
    if not math.isfinite(args.beta):
        raise _fail(f"--beta: must be finite, got {args.beta}")
    return args.beta, None


@report_errors(ExtrapolationError)
def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    beta, target = _resolve_beta(args)
    try:
        selector = TensorSelector(include=args.include, exclude=args.exclude)
    except ValueError as e:
        flag = "--include" if str(e).startswith("include") else "--exclude"
        raise _fail(f"{flag}: {e}") from None
    log = extrapolate_checkpoint(
        args.t0_path, args.t1_path, args.out,
        beta=beta, selector=selector, t0_step=args.t0, t1_step=args.t1, target_step=target,
        overwrite=args.overwrite,
    )  # fmt: skip
    t = log["totals"]
    steps = ""
    if log["t0"] is not None and log["t1"] is not None:
        steps = f" (t0={log['t0']}, t1={log['t1']} → target {log['target']:g})"
    print(
        f"β = {beta:g}{steps}: projected {t['num_projected']}/{t['num_tensors']} tensors "
        f"({t['params_projected']:,} parameters, ‖W_t1 − W_t0‖ = {_fmt(t['projected_displacement_norm'])}), "
        f"copied {t['num_copied']} from t1 → {log['out']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
