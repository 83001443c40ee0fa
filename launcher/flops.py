"""Model FLOPs per token and model FLOPs utilization (MFU): achieved model FLOP/s over the devices' peak.

Training FLOPs per token (forward and backward), counted from the model's shape:

    sum over matrix parameters p of  numel(p) * (2 forward + 2 input gradient + 2 weight gradient)
    + 12 * n_layer * attention_width * seq_len

- Matrix parameters: every parameter of two or more dimensions except an embedding table used only as a
  lookup (a lookup is no matmul; an input embedding tied to the output head counts, as the head). Biases
  and norm scales are left out: their element-wise work is not matrix-multiply FLOPs (under 0.1% of N for
  GPT-2 small). This is the 6N of Kaplan et al., PaLM and torchtitan with N the non-embedding parameters.
- Frozen parameters have no weight gradient: 4 per parameter instead of 6. Parameters before the first
  trainable one also need no input gradient, as autograd then skips it: 2 (a frozen embedding and lower
  layers, for instance). "Before" is the model's parameter order, which is its forward order for the
  built-in GPT and Hugging Face decoders, at the granularity of a layer: the layer holding the first
  trainable parameter counts whole (an over-count when only its later part trains).
- Attention scores and their weighted sum: 4 * seq_len * width per token and layer forward, twice that
  backward, where width = heads * head dimension. As in PaLM and torchtitan it is not halved for the
  causal mask, so the figures compare with theirs; a layer before the first trainable parameter counts
  its forward only. Sliding-window attention is counted as full attention over seq_len.

Tokens are target tokens (padding counts as waste). The peak is dense (no 2:4 sparsity) tensor FLOP/s
from the vendors' datasheets, for the dtype the matmuls run in, or `train.peak_tflops`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from launcher.models import GPT

# Dense peak TFLOP/s of one GPU by matmul dtype (datasheet figures; "tf32" is fp32 with TF32 matmuls on).
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0},
}
# torch.cuda.get_device_name() -> table row, first match wins ("NVIDIA H100 80GB HBM3" is the SXM card)
DEVICE_NAMES = [
    (r"\bGH200\b", "H200"),
    (r"\bH200 NVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bH100 NVL\b", "H100 NVL"),
    (r"\bH100 PCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b", "A10"),
    (r"\bB200\b", "B200"),
]


@dataclass
class Mfu:
    """Turns a measured throughput into MFU."""

    flops_per_token: float  # training FLOPs per target token
    peak_flops: float  # FLOP/s of all processes together

    def of(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak_flops


def flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token of the bare model (see the module docstring); None when its shape is unknown:
    neither the built-in GPT nor a module with a Hugging Face style `.config`, or a mixture of experts."""
    shape = attention_shape(model)
    if shape is None:
        return None
    width, n_layer, layers = shape
    named = list(model.named_parameters())  # each parameter once, in the model's order
    position = {id(p): i for i, (_, p) in enumerate(named)}
    # a layer may list its parameters in another order than it uses them (Llama lists its norms last and
    # applies them first): a trainable parameter inside a layer makes gradients flow from just before that layer
    before_layer = {id(p): min(position[id(q)] for q in layer.parameters()) - 0.5 for layer in layers or [] for p in layer.parameters()}
    first_trainable = min((before_layer.get(id(p), i) for i, (_, p) in enumerate(named) if p.requires_grad), default=len(named))
    lookup_only, tied_head = _embedding_use(model)
    total = 0.0
    for i, (_, p) in enumerate(named):
        if len(getattr(p, "ds_shape", p.shape)) < 2 or id(p) in lookup_only:
            continue
        # a tied input embedding also works as the output head, which comes after every layer
        needs_input_grad = i > first_trainable or id(p) in tied_head
        total += _numel(p) * (2 + 2 * needs_input_grad + 2 * p.requires_grad)
    for k in range(n_layer):
        # without the layers located, every layer's attention is counted with its backward
        last = max((position[id(p)] for p in layers[k].parameters()), default=len(named)) if layers else len(named)
        total += 4 * width * seq_len * (3 if first_trainable <= last else 1)
    return total


def attention_shape(model: nn.Module) -> tuple[int, int, list[nn.Module] | None] | None:
    """(attention width, layer count, the layers if found) of the built-in GPT or of a Hugging Face style model."""
    if isinstance(model, GPT):
        return model.tok_embed.embedding_dim, len(model.blocks), list(model.blocks)
    config = getattr(model, "config", None)
    n_layer, n_head = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not isinstance(n_layer, int) or not isinstance(n_head, int) or getattr(config, "num_experts_per_tok", None):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    # the module list of the n_layer decoder layers (model.layers, transformer.h, ...)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layer]
    return n_head * head_dim, n_layer, list(stacks[0]) if stacks else None


def _embedding_use(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of embedding tables used only as lookups, and of those tied to another module (an output head)."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():  # a shared (tied) Parameter is listed under each module that holds it
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    in_embedding = {pid for pid, mods in holders.items() if any(isinstance(m, nn.Embedding) for m in mods)}
    tied = {pid for pid in in_embedding if not all(isinstance(m, nn.Embedding) for m in holders[pid])}
    return in_embedding - tied, tied


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 keeps only a shard in the tensor


def matmul_dtype(model: nn.Module, mixed_precision: str) -> str:
    """The dtype the model's matmuls run in: the autocast one, else that of most parameters (fp32 counts as tf32
    when PyTorch is allowed TF32 matmuls)."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + _numel(p)
    dtype = max(counts, key=counts.get) if counts else torch.float32
    if dtype in (torch.bfloat16, torch.float16):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return "tf32" if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32 else "fp32"


def known_gpu(device_name: str) -> str | None:
    return next((row for pattern, row in DEVICE_NAMES if re.search(pattern, device_name, re.IGNORECASE)), None)


def peak_tflops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """Peak dense TFLOP/s of one device from the table, and what it is (or why there is none)."""
    if device.type != "cuda":
        return None, f"no peak FLOP/s known for {device.type}"
    name = torch.cuda.get_device_name(device)
    row = known_gpu(name)
    if row is None or dtype not in PEAK_TFLOPS[row]:
        return None, f"no peak {dtype} FLOP/s known for {name}"
    return PEAK_TFLOPS[row][dtype], f"{name} ({row}), dense {dtype}"


def make_mfu(
    model: nn.Module, seq_len: int, device: torch.device, mixed_precision: str, configured_tflops: float | None, processes: int
) -> tuple[Mfu | None, str]:
    """The MFU meter of a run, and one line saying how mfu is computed or why it is not logged."""
    per_token = flops_per_token(model, seq_len)
    if per_token is None:
        return None, (
            "mfu: not logged: the model's layer count and attention width are unknown (neither the"
            " built-in GPT nor a module with a Hugging Face config, or a mixture of experts)"
        )
    dtype = matmul_dtype(model, mixed_precision)
    if configured_tflops is not None:
        tflops, source = configured_tflops, "train.peak_tflops"
    else:
        tflops, source = peak_tflops(device, dtype)
        if tflops is None:
            return None, f"mfu: not logged: {source}; set train.peak_tflops (the device's dense peak in TFLOP/s)"
    line = (
        f"mfu: {_si(per_token)}FLOP per token (6N + attention at seq_len {seq_len}) over"
        f" {tflops:g} TFLOP/s per device ({source}) x {processes} process{'es' if processes > 1 else ''}"
    )
    return Mfu(per_token, tflops * 1e12 * processes), line


def _si(value: float) -> str:
    """6.24e8 -> '624 M': the number with an SI prefix, for a unit to follow."""
    exponent = min(max(int(math.log10(value)) // 3, 0), 4) if value > 0 else 0
    return f"{value / 1000**exponent:.4g} {('', 'k', 'M', 'G', 'T')[exponent]}"
