"""Preemption: a signal only sets a flag; the loop acts on it at the next optimizer-step boundary.

SIGUSR1 (what SLURM sends before a time limit or preemption), SIGTERM and a first Ctrl-C (SIGINT) are
caught. Nothing heavy runs inside the handler. At each step boundary all ranks agree on whether any
rank was signalled, with one small all-reduce on a CPU (gloo) group, so the check never waits for the
GPU; then every rank saves the same checkpoint and the process exits with EXIT_PREEMPTED. A second
Ctrl-C ends the process at once (EXIT_ABORTED), without a checkpoint and without a traceback.
"""

from __future__ import annotations

import os
import signal

from launcher.exits import EXIT_ABORTED, EXIT_PREEMPTED  # noqa: F401 - EXIT_PREEMPTED: re-exported for callers

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
INTERRUPTED = "launcher: interrupted: stopping after this step with a checkpoint (exit 75); Ctrl-C again to stop at once\n"
ABORTED = "launcher: interrupted twice: stopped at once, without a checkpoint (the newest complete one is kept)\n"


class PreemptionFlag:
    """Create it as early as possible: a signal that arrives before the handler exists kills the process."""

    def __init__(self, signals=SIGNALS):
        self.received: list[int] = []  # signal numbers, in arrival order (a second one changes nothing, but Ctrl-C)
        self.on_abort = lambda: None  # what a second Ctrl-C does before the process ends (release the output_dir lock)
        for signum in signals:
            signal.signal(signum, self._handle)
        self._group = None

    def connect(self) -> None:
        """Once the process group exists (every rank calls it): the group the flags are agreed on."""
        import torch.distributed as dist  # here, not at import: the handler is installed before torch loads

        if self._group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a separate gloo group: the agreement is a CPU tensor even when training runs on NCCL
            self._group = dist.new_group(backend="gloo")

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
        self.received.append(signum)

    def agreed(self, fault: bool = False) -> tuple[bool, bool]:
        """(any rank signalled, any rank's `fault`), the same on every rank (a collective: all ranks call it each step)."""
        import torch
        import torch.distributed as dist

        local = torch.tensor([1 if self.received else 0, 1 if fault else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group)
        return bool(local[0]), bool(local[1])
