"""Memory arithmetic of a run, from the model's shapes and dtypes (the meta model will do): what `launcher plan`
prints per rank and backend, and the size of a checkpoint the storage check makes room for."""

from __future__ import annotations

import torch
from torch import nn


def memory_per_rank(model: nn.Module, world_size: int) -> dict[str, tuple[int, int, int]]:
    """Bytes per rank of the parameters, their gradients and the AdamW state (two moments per trainable element),
    under each backend, from the model's shapes and dtypes (the meta model will do); activations not counted.

    DDP keeps all three whole on every rank. FSDP2 shards each parameter along dim 0, padded to a multiple of the
    world size, and its gradients and moments alike (exact: a test compares a CPU run's allocations). ZeRO-1/2/3
    partition flat buffers evenly and keep an fp32 master copy beside the moments (12 bytes per trainable element
    in the optimizer state); DeepSpeed's own communication buffers are not counted, so those rows are estimates.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]

    def whole(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    def shard(p) -> int:
        shape = p.shape if p.dim() else torch.Size([1])
        rows = -(-shape[0] // world_size)
        return rows * shape[1:].numel() * p.element_size()

    def split(n_bytes: int) -> int:
        return -(-n_bytes // world_size)

    n_trainable = sum(p.numel() for p in trainable)
    fsdp_moments = 2 * sum(shard(p) for p in trainable)
    return {
        "DDP": (whole(params), whole(trainable), 2 * whole(trainable)),
        "ZeRO-1": (whole(params), whole(trainable), split(12 * n_trainable)),
        "ZeRO-2": (whole(params), split(whole(trainable)), split(12 * n_trainable)),
        "ZeRO-3": (split(whole(params)), split(whole(trainable)), split(12 * n_trainable)),
        "FSDP2": (sum(shard(p) for p in params), sum(shard(p) for p in trainable), fsdp_moments),
    }


def checkpoint_bytes(model: nn.Module, uses_deepspeed: bool, mixed_precision: str) -> int:
    """Bytes of one checkpoint: the weights and AdamW's two fp32 moments per trainable element; DeepSpeed under
    bf16/fp16 also keeps fp32 master weights (12 bytes per trainable element in the optimizer state)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trainable * (12 if uses_deepspeed and mixed_precision != "no" else 8)
