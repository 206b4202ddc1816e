"""Hugging Face models in the driver process: the checks every entry point runs on a model folder before anything
starts, its tokenizer, and the causal LMs of the tools that run models outside the actors (the linearity
analysis's probes, logits extrapolation).

A model given as a hub id (no local folder) is passed through unchecked: there is no network to check it with,
and vLLM / transformers report a bad id themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.checkpoints import SafetensorsError, read_json_object, read_safetensors_checkpoint
from orchestrator.cli import first_line
from orchestrator.config import InputError

# Weights transformers and vLLM also load, which have no header to check (presence only).
_BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# A tokenizer's vocabulary is in one of these (without one, transformers builds an empty tokenizer silently).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def is_local(path: str) -> bool:
    """A local folder (or meant as one: an absolute, relative or home path) rather than a hub id like `org/name`."""
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def read_model_config(folder: str | os.PathLike) -> dict:
    """A model folder's config.json as a dict; InputError naming the folder or file otherwise. Standard library
    only."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: expected a model folder (save_pretrained) or a hub id, found no such directory")
    if not path.exists():
        raise InputError(f"{folder}: expected a config.json (a save_pretrained folder), found none")
    return read_json_object(path)


def check_model_dir(folder: str | os.PathLike) -> None:
    """A local model folder transformers and vLLM can load, or InputError naming it and what is wrong: config.json
    (JSON, a model_type transformers knows — vLLM runs every such model, natively or through its transformers
    backend — and loadable by AutoConfig) and the weights (each safetensors header against its file's size; .bin
    weights by presence). The tokenizer is checked where it is loaded (`load_tokenizer`)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    model_type = read_model_config(folder).get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise InputError(
            f"{Path(folder) / 'config.json'}: expected a model_type transformers and vLLM know, found {model_type!r}"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about an odd config would land beside the one error line
    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # whatever transformers rejects; its message is the detail
        raise InputError(
            f"{Path(folder) / 'config.json'}: expected a config transformers can load, found: {first_line(e)}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        read_safetensors_checkpoint(folder)
    except SafetensorsError as e:
        if e.problem != "no_weights" or not any((Path(folder) / name).is_file() for name in _BIN_WEIGHTS):
            raise InputError(str(e)) from None


def load_tokenizer(folder: str):
    """The model's tokenizer (AutoTokenizer); for a local folder, InputError naming it when it has no vocabulary
    file or what it has does not load."""
    from transformers import AutoTokenizer

    if not is_local(folder):
        return AutoTokenizer.from_pretrained(folder)
    if not any((Path(folder) / name).is_file() for name in _VOCAB_FILES):
        raise InputError(f"{folder}: expected a tokenizer ({', '.join(_VOCAB_FILES)}), found none")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # whatever transformers rejects; its message is the detail
        raise InputError(f"{folder}: expected a tokenizer transformers can load, found: {first_line(e)}") from None


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """``AutoModelForCausalLM`` from a checkpoint directory or hub id, in eval mode on ``device``.

    dtype: float32 | bfloat16 | float16 | auto (the checkpoint's own); device: cpu | cuda | auto (cuda when there is
    one)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint is noise
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()


def load_pair(t0_path: str, t1_path: str, dtype: str = "float32", device: str = "auto"):
    """The two checkpoints of a logits extrapolation and t1's tokenizer: (model0, model1, tokenizer).

    Raises ValueError naming the checkpoint when the vocabularies differ."""
    from linearity.logits_extrapolation import vocab_size

    m0, m1 = (load_causal_lm(p, dtype, device) for p in (t0_path, t1_path))
    if vocab_size(m0) != vocab_size(m1):
        raise ValueError(
            f"t1_path {t1_path}: vocabulary size {vocab_size(m1)} differs from t0_path's "
            f"{vocab_size(m0)}; logits extrapolation needs two checkpoints of one model"
        )
    return m0, m1, load_tokenizer(t1_path)
