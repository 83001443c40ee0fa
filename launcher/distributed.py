"""The distributed side effects of a process that trains: the launcher's environment (rank, world size), the
Accelerator and its process group, collectives of the launcher's own, seeding, and ending the process.

Other modules receive `rank`, `world_size` and `is_main_process` as values from here. SLURM's facts are in
launcher.slurm; relaunching as local processes under torchrun in launcher.local_launch.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import TrainConfig
from launcher.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

# torch, accelerate and the backends are imported where they are used (start-up time): the pre-flight reads the
# environment from here, and a bad config is reported before torch is imported (seconds per refused command)


def launched_by_a_launcher() -> bool:
    """True under accelerate launch, torchrun or srun-started workers (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


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
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the call above
        os._exit(1)


def set_parent_death_signal(signum: signal.Signals) -> None:
    """Linux: this process gets `signum` when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def end_process(code: int) -> int:
    """The last step of every process that trains (the ranks reach it together). One that never joined a process group
    (a config error: torch not even imported) returns `code` for a normal exit. One that did leaves it, runs its exit
    hooks, flushes its streams and ends here with `code`, without the interpreter's teardown.

    destroy_process_group only forgets the groups; a group's gloo threads stop when its last reference goes, and
    libraries keep references of their own: functions of torch.distributed.nn (imported by DDP) and of DeepSpeed's
    communication module hold the default group as a default argument value, DeepSpeed keeps its groups in module
    globals, DTensor caches the meshes of FSDP2. Those groups would be freed while the interpreter tears its modules
    down; a gloo thread that then needs the GIL (to free a tensor of the last collective) is ended by the interpreter
    from inside C++, and the process aborts (SIGABRT, "terminate called without an active exception") after a run that
    succeeded. Nothing a process still has to do happens in that teardown."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return code
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its device is gone
            pass
    os._exit(code)


def first_failed_rank(acc: Accelerator, failed: bool) -> int | None:
    """The lowest rank for which `failed` is true, the same on every rank (a collective, and so a barrier), or None."""
    if acc.num_processes == 1:
        return 0 if failed else None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([acc.process_index if failed else acc.num_processes], device=acc.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return None if int(flag.item()) == acc.num_processes else int(flag.item())


def check_hardware(cfg: TrainConfig) -> None:
    import torch

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.mixed_precision: fp16 needs a CUDA GPU (its loss scaler is GPU-only); use bf16 or no on CPU")


def make_accelerator(
    cfg: TrainConfig,
    deepspeed: Path | None = None,
    micro_steps_per_process: int | None = None,
    timeout_s: float = 600,
    output_dir: Path | None = None,
    needs_process_group: bool = False,
) -> Accelerator:
    """The Accelerator, which joins the process group when launched with several processes.

    Accumulation (the micro-steps each process makes per optimizer step) is declared here so that
    `Accelerator.backward` (and DeepSpeed) divide each micro-step's loss by it; the loop multiplies it
    back in its exact token normalization.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    several = env_world_size() > 1
    if not on_cpu and several and output_dir is not None:
        record_flight(output_dir)
    # here: launcher.backends imports accelerate and torch, which a process that only reads its rank does not need
    from launcher.backends.deepspeed import resolved_deepspeed_config, skip_deepspeed_shared_memory_op

    ds_config = resolved_deepspeed_config(deepspeed, cfg, env_world_size())
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config else None
    if plugin is not None and on_cpu:
        # Accelerate silently drops DeepSpeed when told to use the CPU (cpu=True or ACCELERATE_USE_CPU);
        # without that flag, the gloo backend below still keeps the run on the CPU
        os.environ.pop("ACCELERATE_USE_CPU", None)
    if plugin is not None and on_cpu:
        skip_deepspeed_shared_memory_op()
    if plugin is not None and not launched_by_a_launcher():
        # one plain process: DeepSpeed would look for its rank through MPI (mpi4py); give it a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # gloo on CPU; naming it is also what makes Accelerate count DeepSpeed's CPU ranks. The timeout bounds how long
    # a collective waits for a hung rank (DDP and DeepSpeed alike; DeepSpeed's own default is 30 minutes)
    handler = InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl", timeout=timedelta(seconds=timeout_s))
    # Accelerate passes on only the values that differ from its defaults, which would leave a 10-minute timeout
    # to torch's 30-minute gloo default and DeepSpeed's own 30 minutes: pass both, always
    handler.to_kwargs = lambda: {"backend": handler.backend, "timeout": handler.timeout}
    kwargs = [handler] if several or plugin else []
    accelerator = Accelerator(
        cpu=on_cpu and plugin is None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=micro_steps_per_process or cfg.gradient_accumulation_steps,
        dynamo_backend="inductor" if cfg.compile else "no",
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        kwargs_handlers=kwargs,
    )
    if needs_process_group and not torch.distributed.is_initialized():
        # one process under FSDP2: its sharding (a mesh of one rank) and Distributed Checkpoint need a process group
        torch.distributed.init_process_group(handler.backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=handler.timeout)
    return accelerator


def record_flight(output_dir: Path) -> None:
    """NCCL's flight recorder (torch >= 2.3): the last collectives of each rank are kept in memory and, when a
    collective times out, dumped to output_dir/logs/nccl-trace-rank-N. Set before the process group exists;
    values already in the environment win."""
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str((output_dir / "logs" / "nccl-trace-rank-").absolute()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_initial_weights(seed: int) -> None:
    """The same seed on every rank and world size, so initial weights never depend on the launch."""
    from accelerate.utils import set_seed

    set_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank RNG for what should differ between ranks (dropout masks); data order does not use it."""
    from accelerate.utils import set_seed

    set_seed(seed + rank)
