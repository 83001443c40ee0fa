"""Preemption: a signal only sets a flag; the loop acts on it at the next optimizer-step boundary.

SIGUSR1 (what SLURM sends before a time limit or preemption) and SIGTERM are caught. Nothing heavy
runs inside the handler. At each step boundary all ranks agree on whether any rank was signalled,
with one small all-reduce on a CPU (gloo) group, so the check never waits for the GPU; then every
rank saves the same checkpoint and the process exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped early on purpose, run it again to continue
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Create it as early as possible: a signal that arrives before the handler exists kills the process."""

    def __init__(self, signals=SIGNALS):
        self.received: list[int] = []  # signal numbers, in arrival order (a second one changes nothing)
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
        self.received.append(signum)

    def agreed(self) -> bool:
        """True on every rank if any rank has been signalled (a collective: all ranks call it each step)."""
        import torch
        import torch.distributed as dist

        local = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group)
        return bool(local.item())
