"""Stop signals: a signal only sets a flag; the loop acts on it at the next optimizer-step boundary.

What each signal means:
- the requeue signal (SIGUSR1; LAUNCHER_REQUEUE_SIGNAL names another, e.g. USR2), what SLURM's
  `--signal=USR1@T` sends before the time limit: checkpoint, stop, and ask for a requeue (the job
  script requeues the job; preempted.json says `"requeue": true`).
- SIGTERM (scancel, SLURM preemption, a shutdown): checkpoint if it can within the grace time, stop,
  and ask for nothing: a cancelled job ends CANCELLED, and SLURM requeues a preempted job itself
  (PreemptMode=REQUEUE). When both arrive (preemption with `preempt_send_user_signal`), SIGTERM wins.
- a first Ctrl-C (SIGINT): like SIGTERM; a second one ends the process at once (EXIT_ABORTED),
  without a checkpoint and without a traceback.
- SIGHUP (the terminal that started the run was closed, or its ssh connection dropped): like SIGTERM. A
  run whose console is gone stops at the next step boundary with a checkpoint rather than training on
  unseen or dying without one; run it under nohup, tmux or SLURM to have it train on.

Nothing heavy runs inside the handler. At each step boundary all ranks agree, with one small all-reduce
on a CPU (gloo) group, on whether any rank was signalled (and how), whether rank 0's clock says a
time-based checkpoint is due, and whether the main process met a write fault; so the check never waits
for the GPU, and every rank saves the same checkpoint. The all-reduce is started as a step starts and
read at its end (launcher.agreement), so the step hides its latency. The gloo group is a second set of
connections beside NCCL's: GLOO_SOCKET_IFNAME chooses its network interface.
"""

from __future__ import annotations

import os
import signal
import stat
from typing import NamedTuple

from launcher.errors import UsageError
from launcher.exits import EXIT_ABORTED

INTERRUPTED = "launcher: interrupted: stopping after this step with a checkpoint (exit 75); Ctrl-C again to stop at once\n"
ABORTED = "launcher: interrupted twice: stopped at once, without a checkpoint (the newest complete one is kept)\n"
REQUEUE_SIGNAL_VARIABLE = "LAUNCHER_REQUEUE_SIGNAL"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # checkpoint and stop, no requeue


def requeue_signal() -> signal.Signals:
    """The signal that asks for checkpoint-and-requeue: SIGUSR1, or the one LAUNCHER_REQUEUE_SIGNAL names."""
    name = os.environ.get(REQUEUE_SIGNAL_VARIABLE, "USR1").upper()
    name = name if name.startswith("SIG") else "SIG" + name
    found = getattr(signal, name, None)
    if not isinstance(found, signal.Signals) or found in (*STOP_SIGNALS, signal.SIGKILL, signal.SIGSTOP):
        raise UsageError(
            f"{REQUEUE_SIGNAL_VARIABLE}: '{os.environ[REQUEUE_SIGNAL_VARIABLE]}' cannot be the requeue signal;"
            f" name another signal, such as USR1 or USR2"
        )
    return found


def leave_closed_terminal() -> None:
    """After SIGHUP: a write to the terminal that hung up fails (EIO), and the next progress line would end the run
    without its checkpoint. The standard streams that are a terminal (a character device other than /dev/null) go to
    /dev/null from here on; pipes and files are kept, and each rank's log file keeps its output."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                mode, device = os.fstat(fd).st_mode, os.fstat(fd).st_rdev
            except OSError:
                continue
            if stat.S_ISCHR(mode) and device != os.fstat(devnull).st_rdev:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Agreement(NamedTuple):
    """What every rank agreed on at a step boundary."""

    stop: bool  # some rank was signalled: checkpoint and stop
    requeue: bool  # ... with the requeue signal only (no SIGTERM or Ctrl-C anywhere)
    fault: bool  # the main process met a write fault
    time_due: bool  # rank 0's clock: a time-based checkpoint is due

    @classmethod
    def of(cls, values) -> Agreement:
        """From the flags of `PreemptionFlag.flags`, reduced over the ranks by MAX (or SUM: any non-zero is a yes)."""
        requeue, stop, fault, time_due = (bool(v) for v in values)
        return cls(stop=requeue or stop, requeue=requeue and not stop, fault=fault, time_due=time_due)


class PreemptionFlag:
    """Create it as early as possible: a signal that arrives before the handler exists kills the process."""

    def __init__(self, signals=None):
        self.requeue_signal = requeue_signal()
        self.received: list[int] = []  # signal numbers, in arrival order (a second one changes nothing, but Ctrl-C)
        self.on_abort = lambda: None  # what a second Ctrl-C does before the process ends (release the output_dir lock)
        for signum in signals or (self.requeue_signal, *STOP_SIGNALS):
            signal.signal(signum, self._handle)
        self._group = None

    def connect(self, timeout_s: float) -> None:
        """Once the process group exists (every rank calls it): the group the flags are agreed on. `timeout_s`
        (distributed.timeout_s) bounds its all-reduce like the training's collectives: torch would give a new gloo
        group 30 minutes, and a rank that stops responding between two steps would hold the others that long."""
        from datetime import timedelta

        import torch.distributed as dist  # here, not at import: the handler is installed before torch loads

        if self._group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a separate gloo group: the agreement is a CPU tensor even when training runs on NCCL
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def _handle(self, signum, frame) -> None:
        speaks = os.environ.get("RANK", "0") == "0"  # every rank is told; one says so
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            if speaks:
                os.write(2, ABORTED.encode())
            try:
                self.on_abort()
            finally:
                os._exit(EXIT_ABORTED)  # at once: no unwinding through the training step, no traceback
        if signum == signal.SIGINT and speaks:
            os.write(2, INTERRUPTED.encode())
        if signum == signal.SIGHUP:
            leave_closed_terminal()
        self.received.append(signum)

    @property
    def group(self):
        """The gloo group the flags are agreed on; None in a single process (nothing to agree with)."""
        return self._group

    def flags(self, fault: bool = False, time_due: bool = False) -> list[int]:
        """This rank's side of an agreement, in `Agreement.of`'s order."""
        requeue = self.requeue_signal in self.received
        stop = any(s != self.requeue_signal for s in self.received)
        return [int(requeue), int(stop), int(fault), int(time_due)]

    def agreed(self, fault: bool = False, time_due: bool = False) -> Agreement:
        """The same answer on every rank, at once: a blocking collective that every rank calls (the loop uses the
        non-blocking launcher.agreement.StepAgreement instead; its latency grows with the ranks)."""
        import torch
        import torch.distributed as dist

        local = torch.tensor(self.flags(fault, time_due), dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group)
        return Agreement.of(local.tolist())
