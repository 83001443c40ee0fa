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


CONTROL_DIR = "LAUNCHER_CONTROL_DIR"  # set for the workers of a plain multi-process `launcher train`


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `launcher <argv>` as `nproc` local processes under torchrun and return the run's exit code.

    The workers report their pid and their exit code through a private folder and exit 0 themselves, so that
    torchrun reports a deliberate stop (preemption, bad input, a fault) as no failure of its own. A preemption
    signal (SIGUSR1, SIGTERM) or a first Ctrl-C sent to this process reaches the workers as SIGTERM: they stop
    at a step boundary after a checkpoint. A second Ctrl-C ends torchrun and the workers at once. torchrun runs
    in a session of its own, so a terminal's Ctrl-C reaches only this process (which decides what it means)."""
    import shutil
    import tempfile

    from launcher.exits import EXIT_ABORTED, EXIT_FAULT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USAGE
    from launcher.preemption import ABORTED, INTERRUPTED

    control = Path(tempfile.mkdtemp(prefix="launcher-control-"))
    env = dict(os.environ, **{CONTROL_DIR: str(control)})
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "launcher", *argv]
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)
    interrupts = []

    def forward(signum, frame):
        if signum == signal.SIGINT:
            interrupts.append(signum)
            os.write(2, (ABORTED if len(interrupts) > 1 else INTERRUPTED).encode())
            if len(interrupts) > 1:
                os.killpg(child.pid, signal.SIGKILL)  # the workers end with torchrun (their parent-death signal)
                return
        workers = [int(p.read_text()) for p in control.glob("pid-*")]
        if len(workers) < nproc:  # not all started yet: torchrun passes SIGTERM on to every worker
            child.send_signal(signal.SIGTERM)
        for pid in workers if len(workers) == nproc else []:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        code = child.wait()
        if len(interrupts) > 1:
            return EXIT_ABORTED
        reported = {int(p.read_text() or 0) for p in control.glob("exit-*")}
        if code != 0:  # a worker crashed (its traceback is above): torchrun's code
            return code
        for meaning in (EXIT_FAULT, EXIT_USAGE, EXIT_NONFINITE, EXIT_PREEMPTED):
            if meaning in reported:
                return meaning
        return max(reported, default=0)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def _end_with_parent() -> None:
    """In torchrun's process: when the launching `launcher train` dies (a closed terminal), torchrun gets SIGTERM
    and passes it on, so the workers stop after a checkpoint instead of training on unseen."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def announce_to_parent() -> None:
    """Under a plain multi-process `launcher train`: tell it this worker's pid (it signals the workers itself)."""
    if os.environ.get(CONTROL_DIR):
        try:
            (Path(os.environ[CONTROL_DIR]) / f"pid-{env_rank()}").write_text(str(os.getpid()))
        except OSError:
            pass  # the parent is gone


def exit_code_for_parent(code: int) -> int:
    """The code this process exits with: under a plain multi-process `launcher train`, 0 after telling the parent
    `code` (see relaunch); otherwise `code`."""
    if not os.environ.get(CONTROL_DIR):
        return code
    try:
        (Path(os.environ[CONTROL_DIR]) / f"exit-{env_rank()}").write_text(str(code))
    except OSError:
        return code  # the parent is gone
    return 0


def first_failed_rank(acc: Accelerator, failed: bool) -> int | None:
    """The lowest rank for which `failed` is true, the same on every rank (a collective, and so a barrier), or None."""
    if acc.num_processes == 1:
        return 0 if failed else None
    import torch.distributed as dist

    flag = torch.tensor([acc.process_index if failed else acc.num_processes], device=acc.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return None if int(flag.item()) == acc.num_processes else int(flag.item())


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
    if plugin is not None and not launched_by_a_launcher():
        # one plain process: DeepSpeed would look for its rank through MPI (mpi4py); give it a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # gloo on CPU; naming it is also what makes Accelerate count DeepSpeed's CPU ranks
    kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] if on_cpu and (several or plugin) else []
    return Accelerator(
        cpu=on_cpu and plugin is None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=micro_steps_per_process or cfg.gradient_accumulation_steps,
        dynamo_backend="inductor" if cfg.compile else "no",
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        kwargs_handlers=kwargs,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_initial_weights(seed: int) -> None:
    """The same seed on every rank and world size, so initial weights never depend on the launch."""
    set_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank RNG for what should differ between ranks (dropout masks); data order does not use it."""
    set_seed(seed + rank)
