"""Gradient diagnostics: pre-clip norms per parameter (the same pass clipping needs), non-finite
detection that names the step, the rank and the parameters, per-layer norms, and a named parameter's
gradient statistics.

Cost per optimizer step: one pass over the gradients (which clipping makes anyway) and a few scalar
kernels. Nothing is read back to the host until a log step, a checkpoint or the end, except with
`diagnostics.nonfinite: skip`, which must know before the optimizer step (one sync per step).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from torch import nn

from launcher.config import DiagnosticsConfig
from launcher.errors import UsageError

SHOWN_OFFENDERS = 5


@dataclass
class GradNorms:
    """Pre-clip norms of one optimizer step's synced gradients."""

    per_param: list[torch.Tensor] | None  # one 0-d tensor per trainable parameter, in model order; None under DeepSpeed
    total: torch.Tensor  # the global norm over all of them


def gradient_norms(params: list[nn.Parameter], norm_type: float) -> GradNorms:
    """Pre-clip norms of the synced (and already unscaled) full gradients: per parameter and in total."""
    with_grad = [p for p in params if p.grad is not None]
    per_grad = torch._foreach_norm([p.grad for p in with_grad], norm_type)  # what clip_grad_norm_ computes, kept per parameter
    total = torch.linalg.vector_norm(torch.stack(per_grad), norm_type)
    if len(with_grad) == len(params):
        return GradNorms(list(per_grad), total)
    zero, it = total.new_zeros(()), iter(per_grad)  # a parameter no loss reached has no gradient: norm 0
    return GradNorms([next(it) if p.grad is not None else zero for p in params], total)


def clip_gradients(params: list[nn.Parameter], max_norm: float | None, norms: GradNorms) -> None:
    """Scale the gradients so their total norm (`norms.total`, measured before) is at most `max_norm`."""
    if max_norm is not None:
        # min(1, max_norm / norm) as a device scalar: no host-device sync
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norms.total)


class NonFiniteWatch:
    """Notices the first inf/nan loss or gradient on the device, and reports where it came from.

    `local_norms` (the backend's): each rank's own gradient norms just before they are averaged (after it,
    one rank's nan is every rank's), so the report can say which rank produced it; None where the backend
    has none, `no_local_norms` then says why. Under fp16 a non-finite gradient is the loss scaler's normal
    overflow skip and is not flagged; a non-finite loss is.
    """

    def __init__(
        self, names: list[str], rank: int, device: torch.device, fp16: bool, local_norms: list[torch.Tensor] | None, no_local_norms: str = ""
    ):
        self.names, self.rank, self.fp16 = names, rank, fp16
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.first_local = torch.zeros(len(names), device=device)
        self.first_global = torch.zeros(len(names), device=device)
        self.current = None
        self.local_norms, self.no_local_norms = local_norms, no_local_norms

    def record(self, step: int, local_loss: torch.Tensor, norms: GradNorms) -> torch.Tensor:
        """After optimizer step `step` (1-based) is measured: a device bool, True when it is bad on this rank."""
        global_vec = torch.stack(norms.per_param) if norms.per_param is not None else self.first_global
        local_vec = torch.stack(self.local_norms) if self.local_norms is not None else global_vec
        bad = ~torch.isfinite(local_loss)
        if not self.fp16:
            bad = bad | ~torch.isfinite(norms.total) | ~torch.isfinite(local_vec).all()
        newly = bad & (self.first_step < 0)
        self.first_step = torch.where(newly, step, self.first_step)
        self.first_loss = torch.where(newly, local_loss, self.first_loss)
        self.first_local = torch.where(newly, local_vec, self.first_local)
        self.first_global = torch.where(newly, global_vec, self.first_global)
        self.current = (step, local_loss, local_vec, global_vec, norms.per_param is not None)
        return bad

    def first_bad(self, acc) -> list[str] | None:
        """Collective (every rank at the same step): the report of the earliest bad step over all ranks, or None."""
        steps = acc.gather(self.first_step.reshape(1)).tolist()  # a host-device sync, at log steps only
        if max(steps) < 0:
            return None
        first = min(s for s in steps if s >= 0)
        mine = self.first_step.item() == first
        return self._report(acc, first, self.first_loss, self.first_local, self.first_global, mine, "stop")

    def current_is_bad(self, acc, bad: torch.Tensor) -> bool:
        """Collective, once per step (a host-device sync): whether any rank flagged this step."""
        return bool(acc.gather(bad.reshape(1).to(torch.int32)).any().item())

    def current_report(self, acc) -> list[str]:
        step, loss, local_vec, global_vec, _ = self.current
        return self._report(acc, step, loss, local_vec, global_vec, True, "skip")

    def _report(self, acc, step, loss, local_vec, global_vec, mine: bool, policy: str) -> list[str]:
        have_names = self.current is not None and self.current[4]
        info = {
            "rank": self.rank,
            "flagged": mine,
            "loss": loss.item(),
            "local": self._offenders(local_vec) if have_names and (self.local_norms is not None or acc.num_processes == 1) else None,
            "global": self._offenders(global_vec) if have_names else None,
        }
        ranks = gather_object([info]) if acc.num_processes > 1 else [info]
        return report_lines(step, ranks, len(self.names), policy, several=acc.num_processes > 1, fp16=self.fp16, no_local_norms=self.no_local_norms)

    def _offenders(self, norms: torch.Tensor) -> list[tuple[str, float]]:
        values = norms.tolist()
        return [(name, v) for name, v in zip(self.names, values) if not math.isfinite(v)]


def report_lines(step: int, ranks: list[dict], n_params: int, policy: str, several: bool, fp16: bool, no_local_norms: str = "") -> list[str]:
    action = {"stop": "stopping (diagnostics.nonfinite: stop)", "skip": "step skipped (diagnostics.nonfinite: skip)"}[policy]
    lines = [f"non-finite loss or gradient at step {step}; {action}"]
    after = None
    for info in sorted(ranks, key=lambda r: r["rank"]):
        if not info["flagged"]:  # its first bad step, if any, came later
            lines.append(f"  rank {info['rank']}: loss and gradients finite")
            continue
        loss = f"loss sum {info['loss']:.6g}" if math.isfinite(info["loss"]) else f"loss sum {info['loss']} (non-finite)"
        if info["global"] is None:
            grads = "gradient names are not available under DeepSpeed (partitioned); rerun with DDP or --debug to name them"
        elif info["local"] is None:
            grads = no_local_norms
        elif fp16:
            grads = "gradients not checked (fp16: overflowing gradients are the loss scaler's skips)"
        else:
            where = "before the all-reduce " if several else ""
            grads = f"gradients {where}" + _describe(info["local"], n_params)
        lines.append(f"  rank {info['rank']}: {loss}; {grads}")
        after = info["global"]
    if several and after is not None and not fp16:
        lines.append("  after the all-reduce: gradients " + _describe(after, n_params))
    return lines


def _describe(offenders: list[tuple[str, float]], n_params: int) -> str:
    if not offenders:
        return "finite"
    shown = ", ".join(f"{name} (norm {value})" for name, value in offenders[:SHOWN_OFFENDERS])
    more = f" and {len(offenders) - SHOWN_OFFENDERS} more" if len(offenders) > SHOWN_OFFENDERS else ""
    return f"non-finite in {len(offenders)} of {n_params} parameters: {shown}{more}"


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the first block index (`blocks.3`), else its module."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


def layer_norms(names: list[str], norms: GradNorms, norm_type: float) -> dict[str, float]:
    """Pre-clip gradient norm of each layer (one host-device sync)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, norm in zip(names, norms.per_param):
        groups.setdefault(layer_of(name), []).append(norm)
    values = torch.stack([torch.linalg.vector_norm(torch.stack(g), norm_type) for g in groups.values()]).tolist()
    return dict(zip(groups, values))


def gradient_stats(grad: torch.Tensor) -> dict[str, float]:
    """Statistics of one synced, pre-clip gradient (one host-device sync)."""
    g = grad.detach().float()
    finite = torch.isfinite(g)
    values = torch.stack(
        [
            torch.linalg.vector_norm(g),
            g.mean(),
            g.std() if g.numel() > 1 else g.new_zeros(()),
            g.min(),
            g.max(),
            g.abs().max(),
            (g == 0).float().mean(),
            (~finite).sum().float(),
        ]
    ).tolist()
    return dict(zip(("norm", "mean", "std", "min", "max", "abs_max", "zero_fraction", "nonfinite"), values))


def format_stats(name: str, shape: torch.Size, step: int, stats: dict[str, float]) -> str:
    dims = "x".join(str(d) for d in shape)
    return (
        f"grad {name} [{dims}] at step {step} (pre-clip): norm {stats['norm']:.4e}  mean {stats['mean']:.3e}"
        f"  std {stats['std']:.3e}  min {stats['min']:.3e}  max {stats['max']:.3e}  |max| {stats['abs_max']:.3e}"
        f"  zeros {100 * stats['zero_fraction']:.1f}%  non-finite {int(stats['nonfinite'])}"
    )


def is_dump_step(cfg: DiagnosticsConfig, step: int, log_every: int) -> bool:
    return bool(cfg.dump_grad) and (step in cfg.dump_grad_steps if cfg.dump_grad_steps else step % log_every == 0)


def check_dump_names(model: nn.Module, names: list[str]) -> None:
    """Every diagnostics.dump_grad name is a trainable parameter of the bare model."""
    params = dict(model.named_parameters())
    problems = []
    for name in names:
        if name not in params:
            closest = difflib.get_close_matches(name, list(params), n=3, cutoff=0.0)
            problems.append(f"diagnostics.dump_grad: no parameter '{name}'; closest names: {', '.join(closest)} (launcher inspect CONFIG lists them)")
        elif not params[name].requires_grad:
            problems.append(f"diagnostics.dump_grad: '{name}' is frozen by the freeze patterns, so it has no gradient; name a trainable parameter")
    if problems:
        raise UsageError(*problems)
