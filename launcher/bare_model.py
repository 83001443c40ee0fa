"""The model before any backend touches it: built from the config, fitted to the tokenizer, LoRA applied, frozen by
name; identical on every rank and world size. Its meta-device twin (names, shapes, freeze status, no weights) is what
the validation pass, `inspect` and `plan` read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from launcher.config import Config
from launcher.diagnostics import check_dump_names
from launcher.distributed import seed_initial_weights
from launcher.errors import Problems
from launcher.freezing import apply_freeze
from launcher.models import build_model, check_model_output, initializers_skipped
from launcher.models.hf import apply_lora, fit_embeddings
from launcher.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def build_bare_model(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer | None = None, weights: bool = True) -> tuple[nn.Module, set[str]]:
    """The model with LoRA and the freeze patterns applied, on CPU, identical on every rank and world size.

    `weights=False` (under the meta device: names and shapes for inspect, plan and the pre-flight) reads no
    weights. The order: build (the tokenizer's vocabulary size decides the embedding), fit the embedding to the
    tokenizer, LoRA (peft freezes the base), then the freeze patterns."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    seed_initial_weights(cfg.seed)
    search_dirs = tuple(dict.fromkeys(d for d in (cfg.config_dir, Path.cwd()) if d is not None))
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, weights, search_dirs)
    if cfg.model.is_hf:
        fit_embeddings(model, tokenizer.vocab_size, cfg)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
    elif weights:
        check_model_output(model, cfg.model, tokenizer.vocab_size, cfg.data.seq_len)
    problems = Problems()
    frozen = problems.check(apply_freeze, model, cfg.freeze)
    problems.check(check_dump_names, model, cfg.diagnostics.dump_grad)
    problems.report()
    return model, frozen


def inspection_model(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer | None = None) -> tuple[nn.Module, set[str]]:
    """The model for names, shapes and freeze status (inspect, plan, the pre-flight), with its frozen names: the
    built-in GPT and Hugging Face models on the meta device (no weights read, no memory); a factory's model for
    real, on CPU, because its code may not run on the meta device (a from_pretrained inside it), and so its logits
    are checked before any process starts."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    if cfg.model.factory is not None:
        return build_bare_model(cfg, tokenizer)
    with torch.device("meta"), initializers_skipped():
        return build_bare_model(cfg, tokenizer, weights=False)
