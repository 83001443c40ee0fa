"""Every distributed side effect in one place: launcher environment, process group, seeding, relaunch.

Other modules receive `rank`, `world_size` and `is_main_process` as values from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed

from launcher import deepspeed_config
from launcher.config import LaunchConfig, TrainConfig
from launcher.errors import UsageError


def launched_by_a_launcher() -> bool:
    """True under accelerate launch, torchrun or srun-started workers (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def deepspeed_json(configured: Path | None) -> Path | None:
    """The DeepSpeed JSON: the config's `deepspeed` key, or the one an accelerate config selected."""
    from_accelerate = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not named or named == "none":
            raise UsageError(
                "accelerate config: DeepSpeed is selected without deepspeed_config_file; name a JSON such as configs/deepspeed/zero2.json there"
            )
        from_accelerate = Path(named)
    if configured and from_accelerate and configured.resolve() != from_accelerate.resolve():
        raise UsageError(
            f"deepspeed: the config names '{configured}' but the accelerate config names '{from_accelerate}'; keep one of them"
        )
    return configured or from_accelerate


def env_rank() -> int:
    """Global rank from the launcher's environment, usable before the process group exists."""
    return int(os.environ.get("RANK", 0))


def die_with_launcher() -> None:
    """Under torchrun or accelerate launch: end this worker when its launcher (agent) dies.

    The agent starts workers in their own sessions, so when it is killed (a node's launcher dying) they
    would live on as orphans, outside what SLURM tracks for the job step, holding the other nodes in
    collectives. With the parent-death signal the whole node goes, the other ranks fail fast, and
    `srun --kill-on-bad-exit` ends the job.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the call above
        os._exit(1)


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def default_resume() -> str | None:
    """`resume` when the config leaves it unset: `auto` inside a SLURM job (a requeued job continues), else none."""
    return "auto" if in_slurm_job() else None


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (it keeps its id; SLURM_RESTART_COUNT counts the restarts).

    SLURM kills the running job at once, so call this only after the checkpoint is complete."""
    if in_slurm_job() and os.environ.get("SLURM_JOB_ID"):
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)


def processes_to_start(cfg: LaunchConfig) -> int:
    if cfg.nproc_per_node != "auto":
        return cfg.nproc_per_node
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `launcher <argv>` as `nproc` local processes under torchrun and return its exit code.

    A preemption signal (SIGUSR1, SIGTERM) or Ctrl-C sent to this process is passed on, so the workers
    stop at a step boundary after a checkpoint, as they would if they had been signalled themselves."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "launcher", *argv]
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        # torchrun passes SIGTERM on to every worker (each then checkpoints and stops); it would die of SIGUSR1
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    return child.wait()


def check_hardware(cfg: TrainConfig) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.mixed_precision: fp16 needs a CUDA GPU (its loss scaler is GPU-only); use bf16 or no on CPU")


def resolved_deepspeed_config(configured: Path | None, cfg: TrainConfig, world_size: int) -> dict | None:
    """The DeepSpeed JSON in use (if any) with every launcher-owned value filled from `cfg` (mismatches refused)."""
    json_path = deepspeed_json(configured)
    if json_path is None:
        return None
    return deepspeed_config.resolve(deepspeed_config.read_deepspeed_json(json_path), cfg, world_size, json_path)


def make_accelerator(cfg: TrainConfig, deepspeed: Path | None = None, micro_steps_per_process: int | None = None) -> Accelerator:
    """The Accelerator, which joins the process group when launched with several processes.

    Accumulation (the micro-steps each process makes per optimizer step) is declared here so that
    `Accelerator.backward` (and DeepSpeed) divide each micro-step's loss by it; the loop multiplies it
    back in its exact token normalization.
    """
    on_cpu = not torch.cuda.is_available()
    several = env_world_size() > 1
    ds_config = resolved_deepspeed_config(deepspeed, cfg, env_world_size())
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config else None
    if plugin is not None and on_cpu:
        # Accelerate silently drops DeepSpeed when told to use the CPU (cpu=True or ACCELERATE_USE_CPU);
        # without that flag, the gloo backend below still keeps the run on the CPU
        os.environ.pop("ACCELERATE_USE_CPU", None)
    # gloo on CPU; naming it is also what makes Accelerate count DeepSpeed's CPU ranks
    kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] if on_cpu and several else []
    return Accelerator(
        cpu=on_cpu and plugin is None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=micro_steps_per_process or cfg.gradient_accumulation_steps,
        dynamo_backend="inductor" if cfg.compile else "no",
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        kwargs_handlers=kwargs,
    )


def seed_initial_weights(seed: int) -> None:
    """The same seed on every rank and world size, so initial weights never depend on the launch."""
    set_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank RNG for what should differ between ranks (dropout masks); data order does not use it."""
    set_seed(seed + rank)
