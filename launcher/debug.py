"""Debug mode (`launcher train CONFIG --debug`): the run's own loop, on one process, for a few steps.

Deterministic algorithms, every parameter listed with its freeze status, the loss and every gradient
checked after each step (log_every 1), per-layer gradient norms each step, and a summary to read
before spending a cluster allocation. Nothing else differs from the real run: same config, same
model, same data order, same loop code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from launcher.config import Config
from launcher.errors import UsageError
from launcher.exits import RunOutcome
from launcher.final import describe
from launcher.formatting import number_text
from launcher.freezing import parameter_listing
from launcher.metrics import read_metrics

DEBUG_MARKER = "debug.json"  # marks a debug run's output_dir, which the next debug run may replace


def debug_config(cfg: Config, steps: int, processes: int) -> Config:
    """The config of a debug run of `cfg`: one process, `steps` steps, two eval batches, its own output_dir."""
    if processes > 1:
        raise UsageError(
            "--debug runs one process; start it as a plain command (launcher train CONFIG --debug), not under torchrun or accelerate launch"
        )
    if steps < 1:
        raise UsageError(f"--debug-steps must be 1 or more (got {steps})")
    cfg = cfg.model_copy(deep=True)
    cfg.launch.nproc_per_node = 1
    cfg.train.max_steps = min(cfg.train.max_steps or steps, steps)
    cfg.train.log_every = 1  # a metrics row, and so a finite check, after every step
    cfg.eval.every_steps, cfg.eval.at_start = None, True
    cfg.eval.max_samples = 2 * (cfg.eval.micro_batch_size or cfg.train.micro_batch_size)
    cfg.checkpoint.every_steps, cfg.resume = None, None
    cfg.deepspeed = None  # DeepSpeed needs its ranks; `launcher plan` shows its resolved config
    cfg.diagnostics.grad_norms_every = cfg.diagnostics.grad_norms_every or 1
    cfg.output_dir = Path(f"{cfg.output_dir}-debug")
    out = cfg.output_dir
    if out.is_dir() and any(out.iterdir()) and not (out / DEBUG_MARKER).is_file():
        raise UsageError(f"output_dir: '{out}' exists and holds something other than a debug run; move it away or set output_dir=NEW_DIR")
    return cfg


def start_debug_run(cfg: Config, steps: int, processes: int) -> Config:
    """Before anything is built: the debug config, and deterministic algorithms."""
    if cfg.deepspeed is not None and processes == 1:
        print(f"debug: one process without DeepSpeed ({cfg.deepspeed}); `launcher plan` shows its resolved config")
    cfg = debug_config(cfg, steps, processes)
    make_deterministic()
    return cfg


def open_debug_run(run, steps: int) -> dict[str, torch.Tensor]:
    """After the run is built: mark its output_dir, list every parameter, and keep the initial weights to compare."""

    model = run.accelerator.unwrap_model(run.model)
    (run.cfg.output_dir / DEBUG_MARKER).write_text(json.dumps({"debug_steps": steps}) + "\n")
    print(parameter_listing(model))
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def make_deterministic() -> None:
    """Deterministic kernels where PyTorch has them (a warning names any op that has none); before CUDA starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with a fixed workspace
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def summary_text(run, result: RunOutcome, before: dict[str, torch.Tensor], anomaly: bool) -> str:
    """What a person checks before submitting: did the loss move, were the gradients sane, which parameters trained."""

    cfg, model = run.cfg, run.accelerator.unwrap_model(run.model)
    rows = read_metrics(cfg.output_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    layers = [r for r in rows if "grad_norm_by_layer" in r]
    lines = [
        "",
        "debug summary",
        f"  {result.steps} steps on one process ({run.accelerator.device}); {run.plan.describe()}",
        f"  deterministic algorithms on; anomaly detection {'on' if anomaly else 'off (--detect-anomaly)'}",
    ]
    if steps:
        lines.append(
            f"  training loss {number_text(steps[0]['loss'])} (step {steps[0]['step']}) -> {number_text(steps[-1]['loss'])} (step {steps[-1]['step']})"
        )
    if len(evals) >= 2:
        lines.append(
            f"  eval loss {number_text(evals[0]['eval_loss'])} (step {evals[0]['step']}) -> {number_text(evals[-1]['eval_loss'])}"
            f" (step {evals[-1]['step']}) on {evals[-1]['eval_tokens']:,} held-out tokens"
        )
    norms = [float(r["grad_norm"]) for r in steps if r.get("grad_norm") is not None]
    if norms:
        max_norm = cfg.train.max_grad_norm
        clipped = f"; clipped to {max_norm:g} on {sum(n > max_norm for n in norms)} of {len(norms)} steps" if max_norm else "; no clipping"
        lines.append(f"  gradient norm before clipping: {min(norms):.4g} .. {max(norms):.4g}{clipped}")
    if result.nonfinite:
        lines.append(f"  NON-FINITE loss or gradient at step {result.steps}: see the report above")
    else:
        lines.append(
            f"  every loss and gradient finite, checked after each of {result.steps} steps"
            + (f" ({result.nonfinite_steps} dropped: diagnostics.nonfinite skip)" if result.nonfinite_steps else "")
        )
    lines += _parameter_changes(model, before)
    if layers:
        last = layers[-1]["grad_norm_by_layer"]
        silent = [name for name, v in last.items() if v == 0]
        lines.append(
            f"  gradient norm by layer at step {layers[-1]['step']}: " + ", ".join(f"{name} {number_text(v, '.3g')}" for name, v in last.items())
        )
        if silent:
            lines.append(f"  WARNING: no gradient reached {', '.join(silent)}")
    if steps:
        s_per_step = sum(r["s_per_step"] for r in steps) / len(steps)
        mfu = [r["mfu"] for r in steps if "mfu" in r]
        lines.append(
            f"  {s_per_step:.3f} s/step, {sum(r['tokens_per_s'] for r in steps) / len(steps):,.0f} target tokens/s"
            + (f", mfu {100 * sum(mfu) / len(mfu):.1f}%" if mfu else "")
            + " (with the per-step checks of debug mode)"
        )
    peaks = [r["max_memory_allocated_gb"] for r in steps if "max_memory_allocated_gb" in r]
    if peaks:  # each row holds its interval's peak (the loop resets it)
        lines.append(f"  peak GPU memory {max(peaks):.2f} GiB")
    if result.weights:
        lines.append(f"  outputs: {cfg.output_dir}/ (metrics.jsonl, {describe(cfg)}); charts: launcher plot {cfg.output_dir}")
    return "\n".join(lines)


def _parameter_changes(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    trained_same, frozen_moved, n_trainable, n_frozen = [], [], 0, 0
    for name, param in model.named_parameters():
        same = torch.equal(param.detach().to("cpu"), before[name])
        if param.requires_grad:
            n_trainable += 1
            trained_same += [name] if same else []
        else:
            n_frozen += 1
            frozen_moved += [name] if not same else []
    lines = [
        f"  parameters: {n_trainable} trainable ({n_trainable - len(trained_same)} changed),"
        f" {n_frozen} frozen ({n_frozen - len(frozen_moved)} unchanged)"
    ]
    if trained_same:
        lines.append(f"  WARNING: trainable but unchanged (no gradient, or learning rate 0): {', '.join(trained_same)}")
    if frozen_moved:
        lines.append(f"  WARNING: frozen but changed: {', '.join(frozen_moved)}")
    return lines
