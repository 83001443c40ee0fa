"""A plain multi-process `launcher train` on one node: the run relaunched as local processes under torchrun, the
workers reporting their pid, exit code or crash to this parent through a private folder, and the parent saying in
one line what ended a run that failed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from launcher.config import LaunchConfig
from launcher.distributed import env_rank, set_parent_death_signal
from launcher.exits import EXIT_ABORTED, EXIT_FAULT, EXIT_HUNG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_RANK_LOST, EXIT_USAGE
from launcher.hang import flight_recorder_lines, read_report
from launcher.preemption import ABORTED, INTERRUPTED, STOP_SIGNALS, PreemptionFlag, leave_closed_terminal, requeue_signal


def processes_to_start(cfg: LaunchConfig) -> int:
    import torch  # here: start-up time

    if cfg.nproc_per_node != "auto":
        return cfg.nproc_per_node
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


CONTROL_DIR = "LAUNCHER_CONTROL_DIR"  # set for torchrun and the workers of a plain multi-process `launcher train`


# torchrun's command line, run by relaunch in place of `python -m torch.distributed.run`
AGENT = "import sys; from launcher.local_launch import run_agent; sys.exit(run_agent(sys.argv[1:]))"


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
    import torch  # here (start-up time): the workers import this module too, before their config is checked

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
    hang = read_report(output_dir, set(pids.values())) if first is not None else None
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
    set_parent_death_signal(signal.SIGTERM)


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
    control = Path(os.environ[CONTROL_DIR])
    text = traceback.format_exc()
    log = getattr(sys.stderr, "log", None)  # library_output.log_to_rank_file's tee: this rank's log file alone
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
