"""Hugging Face causal LMs loaded in the driver process, for the tools that run models outside the actors: the
linearity analysis's probes and logits extrapolation."""

from __future__ import annotations

import os


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
    from transformers import AutoTokenizer

    from linearity.logits_extrapolation import vocab_size

    m0, m1 = (load_causal_lm(p, dtype, device) for p in (t0_path, t1_path))
    if vocab_size(m0) != vocab_size(m1):
        raise ValueError(
            f"t1_path {t1_path}: vocabulary size {vocab_size(m1)} differs from t0_path's "
            f"{vocab_size(m0)}; logits extrapolation needs two checkpoints of one model"
        )
    return m0, m1, AutoTokenizer.from_pretrained(t1_path)
