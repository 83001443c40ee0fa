"""The per-step agreement of every rank, at a blocking cost per step that does not grow with the number of ranks.

At each optimizer-step boundary the ranks agree (launcher.preemption.Agreement) on a stop signal on any rank (and
which one), rank 0's checkpoint clock and a failed metrics write of the main process. An all-reduce that blocks
at the boundary costs its whole latency every step, and gloo's ring for a 4-int tensor is 2(N-1) sequential hops:
about 50 ms a step at 1,024 ranks and ~25 us a hop (benchmarks/agreement_cost.py, README "Performance").

So the flags go out as a step starts, in an all-reduce that gloo's own threads run while the step computes, and
the loop reads the result at the step's end, where it has normally completed: the wait costs nothing while a
step outlasts one all-reduce (and only the difference when it does not). What that changes: a signal that arrives
during step k is in the flags sent as step k+1 starts, so every rank stops after step k+1, one step later than a
blocking agreement; rank 0's clock is read as a step starts and its checkpoint lands at that step's end; a failed
metrics write ends the run one step later.

A log step keeps the exact answer for free: its metrics row all-reduces the loss and waits for it anyway, and the
boundary's stop and fault flags ride in that reduction. So with train.log_every: 1, and at the last step (always
a log step), a signal during step k stops every rank after step k, as before. One process has no one to agree
with and reads its flags at the boundary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.preemption import Agreement, PreemptionFlag

NOTHING = [0, 0, 0, 0]


class StepAgreement:
    """One per training run: `start` as each step starts and `settle` at its end, on every rank, at the same steps."""

    def __init__(self, preemption: PreemptionFlag | None):
        self.preemption = preemption
        self._sent = NOTHING  # one process: the flags as the step started
        self._pending = None  # (work, tensor): the all-reduce in flight since the step started

    def flags(self, fault: bool, time_due: bool = False) -> list[int]:
        """This rank's side, in Agreement.of's order (no preemption flag: only the fault and the clock)."""
        return self.preemption.flags(fault, time_due) if self.preemption is not None else [0, 0, int(fault), int(time_due)]

    def start(self, fault: bool, time_due: bool) -> None:
        """As a step starts: this rank's flags go out; nothing waits here. `time_due` (rank 0's clock) is sent only
        here, so one due checkpoint is never counted twice."""
        group = self.preemption.group if self.preemption is not None else None
        if group is None:
            self._sent = self.flags(fault, time_due)
            return
        tensor = torch.tensor(self.flags(fault, time_due), dtype=torch.int32)
        self._pending = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True), tensor)

    def everyone_started(self) -> bool:
        """Whether every rank has sent this step's flags, i.e. started this step: no wait, no collective. Where issue
        24's hang report can ride on this channel: False long after this rank's step ended means some rank is late or
        hung (which one is for the report's own side channel to say). True in one process."""
        return self._pending is None or self._pending[0].is_completed()

    def settle(self, fault: bool, told: list[float] | None = None) -> Agreement:
        """At the step's end: what every rank sent as the step started, and with `told` (the boundary's flags, already
        summed over every rank by a log step's metrics reduction) what they say now."""
        if self._pending is None:  # one process: its flags now are everyone's
            sent, now = self._sent, self.flags(fault)
        else:
            work, tensor = self._pending
            work.wait()  # normally complete already: the step ran while it did
            sent, now = tensor.tolist(), told or NOTHING
        self._sent, self._pending = NOTHING, None
        return Agreement.of(max(a, b) for a, b in zip(sent, now))
