"""What the launcher reads from any model, whatever built it: dtypes by config name, the transformer blocks (FSDP2's
units), the embedding's rows, and the logits of an output."""

from __future__ import annotations

import torch
from torch import nn

from launcher.models.gpt import Block

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers, the units FSDP2 shards and gathers one at a time: the built-in GPT's blocks, a
    Hugging Face model's `_no_split_modules` classes (its decoder layers); none for a model that has neither."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if m is not model and (isinstance(m, Block) or type(m).__name__ in names)]


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding (the largest token id + 1 the model accepts), where it can be found."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else getattr(model, "tok_embed", None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits
