"""Every distributed side effect in one place: launcher environment, process group, seeding, relaunch.

Other modules receive `rank`, `world_size` and `is_main_process` as values from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import FsdpConfig, LaunchConfig, TrainConfig
from launcher.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from launcher.preemption import PreemptionFlag

# torch, accelerate and the DeepSpeed config are imported where they are used: a bad config is reported before
# torch is imported (seconds per refused command)


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
        raise UsageError(f"deepspeed: the config names '{configured}' but the accelerate config names '{from_accelerate}'; keep one of them")
    return configured or from_accelerate


def fsdp_from_accelerate(configured: FsdpConfig | None, deepspeed: Path | None) -> FsdpConfig | None:
    """The `fsdp` section: the config's, or the one an accelerate config selected (distributed_type FSDP, version 2).
    Accelerate is then told nothing of FSDP: the launcher applies fully_shard itself (launcher.backends)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return configured
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UsageError(
            "accelerate config: FSDP version 1 is not supported; set fsdp_config.fsdp_version: 2 (as configs/accelerate/fsdp2.yaml does)"
        )
    if deepspeed is not None:
        raise UsageError("deepspeed: the config names a DeepSpeed JSON but the accelerate config selects FSDP; keep one of them")
    os.environ.pop("ACCELERATE_USE_FSDP")
    if configured is not None:
        return configured
    return FsdpConfig(
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
        cpu_offload=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
    )


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
    import atexit

    dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its device is gone
            pass
    os._exit(code)


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def restart_count() -> int:
    """SLURM_RESTART_COUNT: 0 for a job's first start, N after N requeues (by the job script or by SLURM's preemption)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", 0)) if in_slurm_job() else 0
    except ValueError:
        return 0


def default_resume() -> str | None:
    """`resume` when the config leaves it unset: `auto` for a restarted SLURM job (it continues its own run), else none.
    A first start follows the normal output_dir rules, inside SLURM as anywhere."""
    return "auto" if restart_count() >= 1 else None


def default_checkpoint_minutes() -> float | None:
    """checkpoint.every_minutes when the config leaves it unset: 30 inside a SLURM job (a preemption without a
    warning, a dead node, loses at most that much), else off."""
    return 30.0 if in_slurm_job() else None


STOP_FILE = "LAUNCHER_STOP_FILE"  # set by slurm/*.sbatch: the batch shell reads it once the step has ended


def report_stop(output_dir: Path, step: int, requeue: bool) -> None:
    """Main process, after a stop checkpoint inside a SLURM job: tell the job script, or requeue from here.

    Under slurm/*.sbatch (LAUNCHER_STOP_FILE) this writes that file and the batch shell decides, on the host, once
    the step has ended: it requeues the job after the requeue signal, and after a SLURM preemption (whose job would
    otherwise end COMPLETED when it stops within the grace time); never after a cancel. That works in containers
    without `scontrol` and never kills a save. Without the job script: `scontrol requeue` from here for the requeue
    signal (it kills the job at once: call this only once the checkpoint is complete)."""
    if not in_slurm_job():
        return
    job = os.environ["SLURM_JOB_ID"]
    stop_file = os.environ.get(STOP_FILE)
    if stop_file:
        try:
            Path(stop_file).write_text(json.dumps({"job": job, "step": step, "requeue": requeue, "output_dir": str(output_dir)}) + "\n")
        except OSError as err:
            print(
                f"launcher: warning: could not tell the job script about the stop ({STOP_FILE}={stop_file}: {err.strerror});"
                f" requeue job {job} by hand to continue",
                file=sys.stderr,
            )
        return
    if not requeue:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=False)
    except FileNotFoundError:
        print(
            f"launcher: warning: no scontrol here (a container?): job {job} is not requeued;"
            f" submit through slurm/train.sbatch, which requeues from the batch shell",
            file=sys.stderr,
        )


def processes_to_start(cfg: LaunchConfig) -> int:
    import torch

    if cfg.nproc_per_node != "auto":
        return cfg.nproc_per_node
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


CONTROL_DIR = "LAUNCHER_CONTROL_DIR"  # set for torchrun and the workers of a plain multi-process `launcher train`
# torchrun's command line, run by relaunch in place of `python -m torch.distributed.run`
AGENT = "import sys; from launcher.distributed import run_agent; sys.exit(run_agent(sys.argv[1:]))"


def relaunch(nproc: int, argv: list[str], preemption: PreemptionFlag, timeout_s: float, output_dir: Path) -> int:
    """Run `launcher <argv>` as `nproc` local processes under torchrun and return the run's exit code.

    The workers report their pid, and their exit code or the exception that ended them, through a private folder, and
    exit 0 after a deliberate end (preemption, bad input, a fault), so that torchrun reports it as no failure of its
    own; torchrun's own messages go to a file there (run_agent), and this process says in one line what ended a run
    that failed (report_failure). A stop signal sent to this process reaches each worker once it exists with its
    handler (it announced itself), as itself (the requeue signal, SIGHUP) or as SIGTERM (SIGTERM, a first Ctrl-C):
    the workers stop at a step boundary after a checkpoint. torchrun itself is never signalled: it would end workers
    that are still starting (exit 241, no output). One that came during the pre-flight (`preemption`) ends the run
    here, before any process starts. A second Ctrl-C ends torchrun and the workers at once. torchrun runs in a session
    of its own, so a terminal's Ctrl-C and hang-up reach only this process (which decides what they mean)."""
    import shutil
    import tempfile

    import torch

    from launcher.exits import EXIT_ABORTED, EXIT_FAULT, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USAGE
    from launcher.preemption import ABORTED, INTERRUPTED, STOP_SIGNALS, leave_closed_terminal, requeue_signal

    requeue = requeue_signal()
    control = Path(tempfile.mkdtemp(prefix="launcher-control-"))
    arrived, for_workers = [], []  # the signals this process got; what the workers are sent, in order
    child = None

    def forward(signum, frame):
        arrived.append(signum)
        if signum == signal.SIGINT:
            interrupts = arrived.count(signal.SIGINT) + preemption.received.count(signal.SIGINT)
            os.write(2, (ABORTED if interrupts > 1 else INTERRUPTED).encode())
            if interrupts > 1 and child is not None:
                os.killpg(child.pid, signal.SIGKILL)  # the workers end with torchrun (their parent-death signal)
                return
        if signum == signal.SIGHUP:
            leave_closed_terminal()
        for_workers.append(signum if signum in (requeue, signal.SIGHUP) else signal.SIGTERM)  # SIGHUP: theirs too
        try:  # a worker reads this file once it announced itself; one that already did is signalled here (both: no harm)
            _write_atomically(control / "signals", " ".join(str(int(s)) for s in for_workers))
        except OSError:
            return  # the run is over: the folder is gone
        for pid in _announced(control).values():
            try:
                os.kill(pid, for_workers[-1])
            except ProcessLookupError:
                pass

    for signum in (requeue, *STOP_SIGNALS):
        signal.signal(signum, forward)
    try:
        early = [*preemption.received, *arrived]  # during the pre-flight, or just now: no process is started
        if early:
            if early.count(signal.SIGINT) > 1:
                return EXIT_ABORTED
            print(
                f"launcher: stopped by {signal.Signals(early[0]).name} during the pre-flight, before any process started:"
                f" nothing was trained; run the command again to start (exit {EXIT_PREEMPTED})",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        env = dict(os.environ, **{CONTROL_DIR: str(control)})
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU
        cmd = [sys.executable, "-c", AGENT, "--standalone", f"--nproc_per_node={nproc}", "-m", "launcher", *argv]
        child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_end_with_parent)
        while True:
            try:
                code = child.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                end_stopped_ranks(control, output_dir)
        if arrived.count(signal.SIGINT) + preemption.received.count(signal.SIGINT) > 1:
            return EXIT_ABORTED
        if code != 0:  # a worker ended by an exception or a signal, or torchrun failed
            return report_failure(control, code, timeout_s, output_dir)
        reported = {int(p.read_text() or 0) for p in control.glob("exit-*")}
        for meaning in (EXIT_FAULT, EXIT_USAGE, EXIT_NONFINITE, EXIT_PREEMPTED):
            if meaning in reported:
                return meaning
        return max(reported, default=0)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def end_stopped_ranks(control: Path, output_dir: Path) -> None:
    """Once a worker has failed waiting for ranks whose process is stopped (SIGSTOP): end those (SIGKILL). torchrun
    would send them SIGTERM, which a stopped process does not act on, and wait 30 s before killing them itself. After
    a hang report of this run, the same for every rank that has not ended: a hung rank does not act on SIGTERM either."""
    from launcher.hang import read_report

    failed = [_read_json(report) or {} for report in control.glob("failed-*.json")]
    doomed = {pid for report in failed for _, pid in report.get("stopped", [])}
    if failed and read_report(output_dir, set(_announced(control).values())) is not None:
        failed_ranks = {report.get("rank") for report in failed}
        ended = {int(p.name[5:]) for p in control.glob("exit-*")}
        doomed |= {pid for rank, pid in _announced(control).items() if rank not in failed_ranks | ended}
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def report_failure(control: Path, code: int, timeout_s: float, output_dir: Path) -> int:
    """After a multi-process run that torchrun ended as failed: one line saying what happened, and the exit code.

    A rank killed by a signal (kill -9, the OOM killer), or one that stopped responding so that another rank's
    collective timed out after distributed.timeout_s, is a lost rank (EXIT_RANK_LOST): the failed collectives of the
    others are its consequence, and their tracebacks stay in their rank logs. Otherwise the rank that failed first
    met an internal error (a bug of the launcher): its traceback is shown, and the code is torchrun's."""
    import shutil

    from launcher.exits import EXIT_HUNG, EXIT_RANK_LOST
    from launcher.hang import flight_recorder_lines
    from launcher.hang import read_report as hang_report_of

    failures = _read_json(control / "failures.json") or {}  # rank: pid and exit code of the ranks torchrun saw fail
    crashes = [c for c in (_read_json(p) for p in control.glob("failed-*.json")) if c]  # the workers' own reports
    ended = {int(p.name[5:]) for p in control.glob("exit-*")}
    pids = _announced(control)
    if (control / "torchrun.log").exists() and (output_dir / "logs").is_dir():
        shutil.copyfile(control / "torchrun.log", output_dir / "logs" / "torchrun.log")
    crashed = {c["rank"] for c in crashes}
    first = min(crashes, key=lambda c: c["time"], default=None)
    killed = sorted((int(r), f) for r, f in failures.items() if f["exitcode"] < 0 and int(r) not in crashed)
    # the ranks another rank's collective waited for in vain: stopped (SIGSTOP), or silent (neither failed nor ended:
    # hung, then ended by torchrun, which is why a timeout comes first: torchrun's kill of a hung rank is no cause)
    stopped = sorted({(rank, pid, " (its process was stopped: SIGSTOP?)") for c in crashes for rank, pid in c["stopped"]})
    silent = [(rank, pid, "") for rank, pid in sorted(pids.items()) if rank not in crashed and rank not in ended]
    hang = hang_report_of(output_dir, set(pids.values())) if first is not None else None
    if hang is not None:  # a collective failed after the hang report named the rank behind (launcher.hang): its line
        flight = flight_recorder_lines(output_dir)  # GPUs: NCCL's own record, dumped at the timeout
        print(
            f"launcher: error: {hang['line']}{'; NCCL flight recorder: ' + ', '.join(flight) if flight else ''}; the run was ended after distributed.timeout_s = {timeout_s:g} s (every rank's"
            f" stack: {output_dir}/hang.json; their output in {output_dir}/logs/); resume=auto continues from the newest complete checkpoint",
            file=sys.stderr,
        )
        return EXIT_HUNG
    if first is not None and "timed out" in first["error"].lower() and (stopped or silent):
        rank, pid, why = (stopped or silent)[0]
        what = (
            f"rank {rank} (pid {pid}) stopped responding{why}: rank {first['rank']} gave up waiting for it after"
            f" distributed.timeout_s = {timeout_s:g} s, and the run was ended"
        )
    elif killed:
        rank, failure = killed[0]
        what = f"rank {rank} (pid {failure['pid']}) was killed by {signal.Signals(-failure['exitcode']).name}; the other ranks were stopped"
    elif first is not None:  # an internal error: the traceback of the rank where it happened
        sys.stderr.write(first["traceback"])
        print(
            f"launcher: error: rank {first['rank']} failed: {first['error'].splitlines()[0]} (its traceback is above; every rank's output is in {output_dir}/logs/)",
            file=sys.stderr,
        )
        return code
    else:  # torchrun itself failed, or a worker ended before it could report (its output is above)
        return code
    print(
        f"launcher: error: {what} (their output, tracebacks included, is in {output_dir}/logs/);"
        f" resume=auto continues from the newest complete checkpoint",
        file=sys.stderr,
    )
    return EXIT_RANK_LOST


def run_agent(args: list[str]) -> int:
    """torchrun (`args`: its command line), as the child of a plain multi-process `launcher train` (relaunch). Its own
    messages (a worker's failure, the shutdown of the others, ChildFailedError's traceback) go to torchrun.log in the
    control folder, and the ranks it saw fail to failures.json there: the parent says what happened in one line. The
    workers write to the console themselves."""
    import traceback

    control = Path(os.environ[CONTROL_DIR])
    # before torch is imported: the loggers of torch.distributed.elastic write to the sys.stderr of that moment
    sys.stdout = sys.stderr = open(control / "torchrun.log", "w", buffering=1)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as err:
        failures = {rank: {"pid": f.pid, "exitcode": f.exitcode} for rank, f in err.failures.items()}
        _write_atomically(control / "failures.json", json.dumps(failures))
        return 1
    except SignalException as err:  # the parent died (the parent-death signal): the workers were told to stop
        return 128 + int(err.sigval)
    except Exception:  # an error of torchrun's own (a rendezvous that failed): its traceback, on the console
        traceback.print_exc(file=sys.__stderr__)
        return 1
    return 0


def _end_with_parent() -> None:
    """In torchrun's process: when the launching `launcher train` dies (a closed terminal), torchrun gets SIGTERM
    and passes it on, so the workers stop after a checkpoint instead of training on unseen."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def announce_to_parent() -> None:
    """Under a plain multi-process `launcher train`: tell it this worker's pid (it signals the workers itself), then
    take the stop signals it got while this worker was starting (its handler exists now: call this after it)."""
    if not os.environ.get(CONTROL_DIR):
        return
    control = Path(os.environ[CONTROL_DIR])
    try:
        _write_atomically(control / f"pid-{env_rank()}", str(os.getpid()))
        pending = (control / "signals").read_text().split() if (control / "signals").exists() else []
    except OSError:
        return  # the parent is gone
    for signum in pending:
        os.kill(os.getpid(), int(signum))


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


def report_crash_to_parent() -> None:
    """Under a plain multi-process `launcher train`, for an exception that ends this worker (a collective that failed
    as another rank died or stopped responding, or a bug): its traceback goes to this rank's log file and to the
    parent, which shows it only if this rank failed first, of its own accord (report_failure), with the ranks whose
    process is stopped at this moment (SIGSTOP); then the process ends with 1, so that torchrun stops the others.
    Returns only without a parent to tell."""
    if not os.environ.get(CONTROL_DIR):
        return
    import time
    import traceback

    control = Path(os.environ[CONTROL_DIR])
    text = traceback.format_exc()
    log = getattr(sys.stderr, "log", None)  # build.log_to_rank_file's tee: this rank's log file alone
    stopped = []
    for rank, pid in _announced(control).items():
        try:  # the state is the field after the command's name in parentheses; T: stopped, t: stopped by a debugger
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t") and rank != env_rank():
                stopped.append((rank, pid))
        except (OSError, IndexError):
            pass
    error = "".join(traceback.format_exception_only(*sys.exc_info()[:2])).strip()  # can span lines (a gloo error in a DDP hook)
    report = {"rank": env_rank(), "time": time.time(), "error": error, "traceback": text, "stopped": stopped}
    try:
        if log is not None:
            log.write(text)
            log.flush()
        _write_atomically(control / f"failed-{env_rank()}.json", json.dumps(report))
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)  # without the teardown: the process group is broken (see end_process)


def _announced(control: Path) -> dict[int, int]:
    """rank: pid of the workers that announced themselves."""
    pids = {}
    for path in control.glob("pid-*"):
        try:
            pids[int(path.name[4:])] = int(path.read_text())
        except (OSError, ValueError):
            pass
    return pids


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Readers of `path` (another process) see all of `text` or no file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


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


def resolved_deepspeed_config(configured: Path | None, cfg: TrainConfig, world_size: int) -> dict | None:
    """The DeepSpeed JSON in use (if any) with every launcher-owned value filled from `cfg` (mismatches refused)."""
    from launcher import deepspeed_config

    json_path = deepspeed_json(configured)
    if json_path is None:
        return None
    return deepspeed_config.resolve(deepspeed_config.read_deepspeed_json(json_path), cfg, world_size, json_path)


def skip_deepspeed_shared_memory_op() -> None:
    """On the CPU, DeepSpeed's communication set-up compiles a shared-memory all-reduce (a minute or two, once per
    machine) and loads it in every process. Only its inference all-reduce uses that op, never training: marked
    unavailable, DeepSpeed goes on without it (its collectives are torch.distributed's, on gloo)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
    import socket

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
