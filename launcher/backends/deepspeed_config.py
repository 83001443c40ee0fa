"""A DeepSpeed JSON resolved against the launcher config, before Accelerate or DeepSpeed see it.

The launcher config owns the batch sizes, accumulation, clipping and precision; in the JSON they
are "auto", and this module fills them. An explicit JSON value that disagrees is refused with one
line per mismatch. Filling them here (rather than leaving "auto" to Accelerate) matters: Accelerate
fills `gradient_clipping: "auto"` with 1.0 whatever the run's max norm, and adopts the JSON's
accumulation steps silently.

The optimizer and LR schedule are the launcher's own (AdamW over the trainable parameters, the
schedule counted in optimizer steps), handed to DeepSpeed as a client optimizer, so the JSON must
not define `optimizer` or `scheduler`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch

from launcher.config import TrainConfig
from launcher.errors import UsageError


def read_deepspeed_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"deepspeed: file '{path}' not found; point it at a JSON such as configs/deepspeed/zero2.json") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix the syntax there") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: the top level must be a JSON object")
    return config


def owned_values(train: TrainConfig, world_size: int) -> dict[str, tuple[object, str]]:
    """DeepSpeed key (dotted) -> (the value the launcher config implies, the launcher key it comes from)."""
    return {
        "train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (train.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (
            train.micro_batch_size * train.gradient_accumulation_steps * world_size,
            "train.micro_batch_size x train.gradient_accumulation_steps x world size",
        ),
        # DeepSpeed reads 0 as "no clipping"
        "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm"),
        "fp16.enabled": (train.mixed_precision == "fp16", "train.mixed_precision"),
        "bf16.enabled": (train.mixed_precision == "bf16", "train.mixed_precision"),
    }


SECTIONS = ("zero_optimization", "fp16", "bf16", "zero_optimization.offload_optimizer", "zero_optimization.offload_param")


def check_values(config: dict, source: Path) -> list[str]:
    """Malformed values, one line each: sections that are not objects, and what DeepSpeed's own config models refuse
    (checked here, before anything starts, rather than as a traceback inside DeepSpeed)."""
    problems = []
    for key in SECTIONS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] is not None and not isinstance(node[leaf], dict):
            problems.append(f"{source}: {key} must be a JSON object (got {json.dumps(node[leaf])}); write it as configs/deepspeed/zero2.json does")
    if problems:
        return problems
    try:
        if not torch.cuda.is_available():  # what DeepSpeed finds anyway, without its warning on every import
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:
        return []  # not installed: the run says so when it starts DeepSpeed
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config), ("bf16", DeepSpeedBF16Config)):
        section = {k: v for k, v in (config.get(key) or {}).items() if v != "auto"}  # "auto": filled by Accelerate
        try:
            model(**section)
        except ValidationError as err:
            for e in err.errors():
                where = ".".join([key, *(str(p) for p in e["loc"])])
                problems.append(
                    f"{source}: {where}: {e['msg'].lower()} (got {json.dumps(e.get('input'), default=str)});"
                    f" fix the value (DeepSpeed's config reference lists each key)"
                )
        except (TypeError, ValueError) as err:
            problems.append(f"{source}: {key}: {err}; fix the value (DeepSpeed's config reference lists each key)")
    return problems


def resolve(config: dict, train: TrainConfig, world_size: int, source: Path) -> dict:
    """The JSON with every launcher-owned value filled; UsageError listing every mismatch and malformed value."""
    shape = check_values(config, source)
    if shape:
        raise UsageError(*shape)
    resolved = copy.deepcopy(config)
    problems = []
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(f"{source}: remove '{section}': the launcher builds AdamW and the LR schedule from train.* and gives them to DeepSpeed")
    if train.grad_norm_type != 2.0:
        problems.append(f"train.grad_norm_type: DeepSpeed clips by the 2-norm only (got {train.grad_norm_type}); set it to 2.0")
    for key, (value, launcher_key) in owned_values(train, world_size).items():
        *parents, leaf = key.split(".")
        node = resolved
        for part in parents:
            node = node.setdefault(part, {})
        current = node.get(leaf, "auto")
        if current != "auto" and not _same(current, value):
            problems.append(
                f'{source}: {key} is {json.dumps(current)} but {launcher_key} gives {json.dumps(value)}; set {key} to "auto" (or make them agree)'
            )
        node[leaf] = value
    if problems:
        raise UsageError(*problems)
    return resolved


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
