"""Freezing parameters by name, on the bare model before it is wrapped by DDP or DeepSpeed.

A pattern is a glob on dotted parameter names (`blocks.0.*`), or a regular expression after `re:`
that must match the whole name (`re:blocks\\.[01]\\..*`). With LoRA the patterns apply after peft has
frozen the base model (so they can freeze adapters too), and they match the names with or without
peft's `base_model.model.` prefix: the same patterns work with and without LoRA.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections import defaultdict

from torch import nn

from launcher.errors import UsageError

PEFT_PREFIX = "base_model.model."  # peft's wrapper adds this to every parameter name


def matches(pattern: str, name: str) -> bool:
    return any(_matches(pattern, n) for n in {name, name.removeprefix(PEFT_PREFIX)})


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def frozen_names(model: nn.Module, patterns: list[str]) -> set[str]:
    """Names the patterns freeze. Raises UsageError for a pattern that matches nothing or freezes everything."""
    names = [name for name, _ in model.named_parameters()]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}  # LoRA: only the adapters
    problems, frozen = [], set()
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                problems.append(f"freeze: '{pattern}' is not a valid regular expression ({err}); fix it")
                continue
        hits = {name for name in names if matches(pattern, name)}
        if not hits:
            closest = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3, cutoff=0.0)
            problems.append(f"freeze: '{pattern}' matches no parameter; closest names: {', '.join(closest)}")
        frozen |= hits
    if not problems and names and trainable <= frozen:
        what = f"all {len(names)} parameters" if len(trainable) == len(names) else f"all {len(trainable)} trainable parameters (the LoRA adapters)"
        problems.append(f"freeze: the patterns freeze {what}; leave at least one trainable")
    if problems:
        raise UsageError(*problems)
    return frozen


def apply_freeze(model: nn.Module, patterns: list[str]) -> set[str]:
    """Set requires_grad=False on the matched parameters; returns the names of every frozen parameter (with
    LoRA, the base model's too)."""
    frozen = frozen_names(model, patterns)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def module_group(name: str) -> str:
    """The row of the parameter table a parameter counts in: its name up to the first layer index
    (`blocks`, `model.layers`, `lm_head`), LoRA adapters in rows of their own."""
    parts = name.removeprefix(PEFT_PREFIX).split(".")
    index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    group = ".".join(parts[:index] if index else parts[:-1]) or name
    return f"{group} (LoRA adapters)" if ".lora_" in name else group


def parameter_table(model: nn.Module) -> str:
    """Trainable and frozen parameter counts per module group, with totals."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        counts[module_group(name)][0 if param.requires_grad else 1] += param.numel()
    rows = [(top, t, f) for top, (t, f) in counts.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    lines += [f"{top:<{width}}  {t:>12,}  {f:>12,}" for top, t, f in rows]
    return "\n".join(lines)


def parameter_listing(model: nn.Module) -> str:
    """Every parameter's name, shape, size and whether it trains, then the per-module table."""
    width = max(len(name) for name, _ in model.named_parameters())
    lines = [f"{'parameter':<{width}}  {'shape':<16} {'numel':>12}  trains"]
    for name, param in model.named_parameters():
        shape = "x".join(str(d) for d in param.shape)
        lines.append(f"{name:<{width}}  {shape:<16} {param.numel():>12,}  {'yes' if param.requires_grad else 'frozen'}")
    return "\n".join(lines + ["", parameter_table(model)])
