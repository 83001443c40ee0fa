"""Every distributed side effect in one place: launcher environment, process group, seeding, relaunch.

Other modules receive `rank`, `world_size` and `is_main_process` as values from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from launcher.config import LaunchConfig, TrainConfig
from launcher.errors import UsageError


def launched_by_a_launcher() -> bool:
    """True under accelerate launch, torchrun or srun-started workers (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """Global rank from the launcher's environment, usable before the process group exists."""
    return int(os.environ.get("RANK", 0))


def processes_to_start(cfg: LaunchConfig) -> int:
    if cfg.nproc_per_node != "auto":
        return cfg.nproc_per_node
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `launcher <argv>` as `nproc` local processes under torchrun and return its exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "launcher", *argv]
    return subprocess.run(cmd, env=env).returncode


def check_hardware(cfg: TrainConfig) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.mixed_precision: fp16 needs a CUDA GPU (its loss scaler is GPU-only); use bf16 or no on CPU")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator, which joins the process group when launched with several processes.

    Accumulation is declared here so that `Accelerator.backward` (and DeepSpeed) divide each
    micro-step's loss by it; the loop multiplies it back in its exact token normalization.
    """
    on_cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1
    # gloo on CPU; naming it is also what makes Accelerate count DeepSpeed's CPU ranks
    kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] if on_cpu and several else []
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dynamo_backend="inductor" if cfg.compile else "no",
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs,
    )


def seed_initial_weights(seed: int) -> None:
    """The same seed on every rank and world size, so initial weights never depend on the launch."""
    set_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank RNG for what should differ between ranks (dropout masks); data order does not use it."""
    set_seed(seed + rank)
