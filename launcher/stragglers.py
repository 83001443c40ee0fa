"""The straggler report: which rank slows every rank to its pace, at log steps.

Each rank's time per step splits into waiting in collectives (launcher.hang's counters: from entering a collective
to its completion) and the rest, its compute. A slow rank (a throttled GPU, a bad NIC, a noisy neighbour) computes
longer and waits less; the others wait for it. At each log step the ranks' compute times ride in the loss's reduction
(a vector over the ranks, each rank's own entry filled: no collective or sync of their own) and the metrics row gets the slowest
rank, its host, and its lag: its compute per step over the median of the other ranks'. A rank whose lag is above
distributed.straggler_factor (and behind the median by more than distributed.straggler_min_lag_s per step) for
distributed.straggler_intervals log intervals in a row is named in one warning line.
On GPUs the host times a collective until it is issued or its callback runs, so the split is approximate there.
"""

from __future__ import annotations

import statistics
import sys
import time

from launcher.config import DistributedConfig
from launcher.hang import RECORD


class Stragglers:
    def __init__(self, acc, cfg: DistributedConfig):
        self.acc, self.factor, self.intervals, self.min_lag_s = acc, cfg.straggler_factor, cfg.straggler_intervals, cfg.straggler_min_lag_s
        self.hosts: list[str] | None = None
        self.streak: dict[int, int] = {}  # rank: log intervals in a row above the factor
        self.warned: set[int] = set()
        self.reset()

    def reset(self) -> None:
        self.started_s, self.wait_s = time.perf_counter(), RECORD.wait_s

    def own_time(self, steps: int) -> list[float]:
        """Every rank, at a log step (`steps`: the optimizer steps since the last): a vector over the ranks holding this
        rank's compute time per step at its own index, zeros elsewhere; summed over the ranks (the loop adds it to the
        log step's loss reduction: no collective of its own) it is every rank's time. Empty for one process."""
        acc = self.acc
        if acc.num_processes == 1:
            return []
        elapsed_s, waited_s = time.perf_counter() - self.started_s, RECORD.wait_s - self.wait_s
        times = [0.0] * acc.num_processes
        times[acc.process_index] = max(elapsed_s - waited_s, 0.0) / max(steps, 1)
        return times

    def row(self, per_rank: list[float]) -> dict:
        """Every rank, with `per_rank` (own_time summed over the ranks): the slowest rank's columns of the metrics row
        (written by the main process), and the warning; nothing for one process."""
        acc = self.acc
        if not per_rank:
            return {}
        if self.hosts is None:
            import socket

            from accelerate.utils import gather_object

            self.hosts = gather_object([socket.gethostname()])  # once
        self.reset()
        slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
        others = statistics.median(v for r, v in enumerate(per_rank) if r != slowest)
        lag = per_rank[slowest] / others if others > 0 else float("inf")
        # both a ratio and seconds: a rank that computes 5x the others' 10 ms steps on a busy CPU costs nobody much
        straggles = lag > self.factor and per_rank[slowest] - others > self.min_lag_s
        for rank in range(len(per_rank)):
            self.streak[rank] = self.streak.get(rank, 0) + 1 if rank == slowest and straggles else 0
        if self.streak[slowest] >= self.intervals and slowest not in self.warned and acc.is_main_process:
            self.warned.add(slowest)
            from tqdm.auto import tqdm

            tqdm.write(
                f"launcher: warning: rank {slowest} (host {self.hosts[slowest]}) is a straggler: it computes {lag:.1f}x as long"
                f" per step as the other ranks' median ({per_rank[slowest]:.3g} s vs {others:.3g} s) for {self.streak[slowest]}"
                f" log intervals in a row, and every rank waits for it (a throttled GPU, a bad NIC, a busy host?)",
                file=sys.stderr,
            )
        return {
            "slowest_rank": slowest,
            "slowest_host": self.hosts[slowest],
            "slowest_lag": lag,
            "slowest_compute_s": per_rank[slowest],
            "median_compute_s": others,
        }
