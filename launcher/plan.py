"""`launcher plan`: what a run will do, computed from the config alone (no GPU, no training).

It runs the same validation as a real run (config, DeepSpeed JSON, freeze patterns, data), uses the
same batch arithmetic (batches.py) and the same tokenized data, so its numbers are the run's.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass

from launcher.bare_model import inspection_model
from launcher.config import Config
from launcher.data import make_mixture, prepare_splits, target_counts
from launcher.errors import Problems, UsageError
from launcher.formatting import bytes_text
from launcher.freezing import parameter_table
from launcher.memory import activation_line, chosen_backend, memory_table, suggestions
from launcher.validate import check_documents, validate_run


@dataclass
class Allocation:
    nodes: int
    processes_per_node: int
    time_limit_s: float | None = None  # the SLURM job's time limit
    step_s: float | None = None  # an estimated (or measured) seconds per optimizer step
    signal_margin_s: float = 180.0  # slurm/train.sbatch's --signal=USR1@180
    cpus_per_task: int | None = None  # CPUs of the one task per node (shared by its processes); None: --exclusive
    mem: str | None = None  # memory per node (sbatch --mem); None: all of it (--mem=0)


def plan_text(
    cfg: Config,
    config_path: str,
    overrides: list[str],
    alloc: Allocation,
    compare_backends: bool = False,
    device: tuple[str, int] | None = None,
    as_json: bool = False,
) -> str:
    """The plan as text, or (`as_json`) as one JSON object. `device`: (name, bytes) of the GPU to check the peak against."""
    world_size = alloc.nodes * alloc.processes_per_node
    problems = Problems()  # what the run checks, and fails on, first: every problem in one report
    checked = validate_run(cfg, world_size, problems)
    problems.check(check_documents, cfg)
    problems.report()
    ds_config, batch, model = checked.deepspeed, checked.plan, checked.model
    train_blocks, eval_blocks = prepare_splits(cfg.data, cfg.seed, checked.tokenizer)
    mixture = make_mixture(cfg.data, train_blocks, cfg.seed)  # data.sources: an epoch is the mixture's rows, not the sources'
    n_train = mixture.epoch_size if mixture is not None else len(train_blocks)
    steps_per_epoch = batch.steps_per_epoch(n_train)
    total_steps = batch.total_steps(n_train, cfg.train.max_steps, cfg.train.epochs)
    targets_per_epoch = mixture.target_tokens_per_epoch if mixture is not None else int(target_counts(train_blocks).sum())
    memory, chosen, fit = plan_memory(cfg, ds_config, model, batch.world_size, device)
    if as_json:
        data = {
            "world_size": world_size,
            "nodes": alloc.nodes,
            "processes_per_node": alloc.processes_per_node,
            "global_batch_size": batch.global_batch_size,
            "micro_batch_size": batch.micro_batch_size,
            "gradient_accumulation_steps": batch.gradient_accumulation_steps,
            "seq_len": cfg.data.seq_len,
            "training_samples": n_train,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "backend": chosen,
            "memory": {name: row.as_json() for name, row in memory.items()},
            "decided": checked.notes,
        }
        if fit is not None:
            data["device"] = fit
        return json.dumps(data, indent=2)

    lines = [
        f"world size {world_size} = {alloc.nodes} node(s) x {alloc.processes_per_node} process(es)",
        f"{batch.describe()}",
        *checked.notes,
        f"tokens per optimizer step: up to {batch.global_batch_size * cfg.data.seq_len:,} inputs"
        f" ({cfg.data.seq_len} per sample); {targets_per_epoch / steps_per_epoch:,.0f} target tokens on average",
        f"{n_train} training samples, {steps_per_epoch} steps per epoch, {total_steps} steps"
        f" ({total_steps / steps_per_epoch:.2f} epochs); {len(eval_blocks) if eval_blocks is not None else 0} held-out samples",
        *([mixture.describe()] if mixture is not None else []),
        "",
        parameter_table(model),
        "",
    ]
    lines += memory_lines(cfg, memory, chosen, batch.world_size, compare_backends, fit) + [""]
    if ds_config is not None:
        lines += [f'DeepSpeed config ({cfg.deepspeed or "from the accelerate config"}), every "auto" filled:', json.dumps(ds_config, indent=2), ""]
    lines += checkpoint_cadence(cfg, total_steps, alloc)
    lines += ["", "commands:", *command_lines(config_path, overrides, alloc)]
    return "\n".join(lines)


def plan_memory(cfg: Config, ds_config: dict | None, model, world_size: int, device: tuple[str, int] | None):
    """(rows per backend, the run's backend, whether its peak fits `device` (None: no device given))."""

    line = activation_line(cfg, model)
    table = memory_table(cfg, model, world_size, cfg.train.micro_batch_size, ds_config, line)
    chosen = chosen_backend(cfg, ds_config)
    if device is None:
        return table, chosen, None
    name, capacity = device
    peak = table[chosen].peak
    fit = {"name": name, "bytes": capacity, "fits": peak <= capacity, "margin": capacity - peak}
    if peak > capacity:
        checkpointed = None
        if not cfg.model.gradient_checkpointing and cfg.model.factory is None:
            trial = cfg.model_copy(deep=True)
            trial.model.gradient_checkpointing = True
            checkpointed = inspection_model(trial)[0]
        fit["suggestions"] = suggestions(cfg, model, world_size, capacity, ds_config, line, checkpointed)
    return table, chosen, fit


def memory_lines(cfg: Config, table: dict, chosen: str, world_size: int, compare_backends: bool, fit: dict | None) -> list[str]:
    """Per-rank bytes at the step's peak: the run's backend, or every backend; whether it fits the device."""

    rows = table if compare_backends else {chosen: table[chosen]}
    lines = [
        f"memory per rank at the step's peak (world size {world_size}, micro-batch {cfg.train.micro_batch_size}, seq_len {cfg.data.seq_len};"
        " activations traced on the meta device; ZeRO rows estimated):",
        f"  {'backend':<8} {'parameters':>11} {'gradients':>11} {'optimizer':>11} {'activations':>11} {'buffers':>11} {'peak':>11}",
    ]
    for name, row in rows.items():
        mark = "  <- this run" if compare_backends and name == chosen else ""
        parts = (row.parameters, row.gradients, row.optimizer, row.activations, row.buffers, row.peak)
        lines.append(f"  {name:<8} " + " ".join(f"{bytes_text(n):>11}" for n in parts) + mark)
    row = table[chosen]
    lines.append(f"  activations include the logits and loss at seq_len x vocab: {bytes_text(row.logits)}")
    if chosen == "FSDP2" and cfg.train.gradient_accumulation_steps > 1 and not cfg.fsdp.sync_every_micro_step:
        lines.append("  FSDP2 gradients include the window's unsharded gradients (fsdp.sync_every_micro_step: true keeps them sharded)")
    if fit is not None:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        lines.append(
            f"  on {fit['name']} ({bytes_text(fit['bytes'])}): the peak {verdict}, margin {'' if fit['fits'] else '-'}{bytes_text(abs(fit['margin']))}"
        )
        if not fit["fits"]:
            lines += ["  what would fit (predicted peak per rank, the same global batch):", *fit["suggestions"]]
    if not compare_backends:
        lines.append("  (--compare-backends: DDP, ZeRO-1/2/3 and FSDP2 side by side)")
    return lines


def checkpoint_cadence(cfg: Config, total_steps: int, alloc: Allocation) -> list[str]:
    every = cfg.checkpoint.every_steps
    minutes = cfg.checkpoint.every_minutes
    lines = [
        f"checkpoints: every {every} steps and at the end" if every else "checkpoints: on a stop signal (checkpoint.every_steps is null)",
        f"  and every {minutes:g} min of training"
        if minutes
        else "  and every 30 min of training inside a SLURM job (checkpoint.every_minutes is null)",
    ]
    if alloc.step_s is None:
        return lines + ["  (give --step-time-s to see the cadence in time)"]
    lines.append(
        f"  at {alloc.step_s:g} s/step: the run takes {total_steps * alloc.step_s / 3600:.2f} h"
        + (f", a checkpoint every {every * alloc.step_s / 60:.1f} min" if every else "")
    )
    if alloc.time_limit_s is not None:
        steps_per_job = int(max(0.0, alloc.time_limit_s - alloc.signal_margin_s) / alloc.step_s)
        jobs = -(-total_steps // max(1, steps_per_job))
        lines.append(
            f"  a {alloc.time_limit_s / 3600:.2f} h allocation (USR1 {alloc.signal_margin_s:.0f} s before its end)"
            f" runs about {steps_per_job} steps: "
            + ("the run fits in one" if jobs == 1 else f"{jobs} jobs, each requeued automatically after its preemption checkpoint")
        )
        if every and every > steps_per_job:
            lines.append(
                f"  warning: checkpoint.every_steps={every} is longer than one allocation; only the preemption checkpoint will save progress"
            )
    return lines


def command_lines(config_path: str, overrides: list[str], alloc: Allocation) -> list[str]:
    args = " ".join(shlex.quote(a) for a in [config_path, *overrides])
    world = alloc.nodes * alloc.processes_per_node
    if alloc.nodes == 1:
        accelerate = f"  accelerate launch --multi_gpu --num_processes {world} -m launcher train {args}" if world > 1 else f"  launcher train {args}"
    else:
        accelerate = (
            f"  accelerate launch --multi_gpu --num_machines {alloc.nodes} --num_processes {world}"
            f" --machine_rank $NODE_RANK --main_process_ip $HEAD_ADDR --main_process_port 29500"
            f" -m launcher train {args}   # on every node"
        )
    time = f" --time={slurm_time(alloc.time_limit_s)}" if alloc.time_limit_s else ""
    cpus = f"--cpus-per-task={alloc.cpus_per_task}" if alloc.cpus_per_task else "--exclusive"
    mem = f"--mem={alloc.mem or 0}"
    sbatch = (
        f"  sbatch --nodes={alloc.nodes} --ntasks-per-node=1 --gpus-per-node={alloc.processes_per_node} {cpus} {mem}{time} slurm/train.sbatch {args}"
    )
    threads = (
        f"{alloc.cpus_per_task} CPUs / {alloc.processes_per_node} processes = {max(1, alloc.cpus_per_task // alloc.processes_per_node)}"
        if alloc.cpus_per_task
        else f"the node's CPUs / {alloc.processes_per_node} processes"
    )
    return [accelerate, sbatch, f"  (each process: OMP_NUM_THREADS = {threads}; --exclusive --mem=0 takes whole nodes)"]


def slurm_time(seconds: float) -> str:
    """SLURM's --time format, HH:MM:SS (hours past 24 kept as hours)."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_duration(text: str) -> float:
    """SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes and
    days-hours:minutes:seconds, in whole numbers; more than zero."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise UsageError(f"--time-limit: '{text}' is not a time; use HH:MM:SS (SLURM's format), e.g. 04:00:00")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + sum(n * unit for n, unit in zip(numbers, (3600, 60, 1)))
    else:  # MM, MM:SS or HH:MM:SS
        seconds = sum(n * unit for n, unit in zip(numbers, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(numbers)]))
    if seconds <= 0:
        raise UsageError(f"--time-limit: '{text}' is no time at all; give the job's time limit, e.g. 04:00:00")
    return float(seconds)


def check_step_time(step_time_s: float | None) -> float | None:
    """--step-time-s: a finite number of seconds, more than zero."""
    if step_time_s is not None and not (math.isfinite(step_time_s) and step_time_s > 0):
        raise UsageError(f"--step-time-s: {step_time_s} is not a time a step can take; give the seconds of one optimizer step, e.g. 1.5")
    return step_time_s
