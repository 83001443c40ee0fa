"""Batch arithmetic and which samples make up each optimizer step.

The samples of global step `s` are a slice of a seeded per-epoch permutation of the training split,
`global_batch_size` long (shorter for the last step of an epoch). They depend on the seed, the
epoch and the global batch size only, never on how the global batch is split into ranks and
micro-steps: a run moved from 2 ranks x 4 micro-steps to 1 rank x 8 gets the same updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int  # samples per rank per micro-step
    gradient_accumulation_steps: int  # micro-steps per rank per optimizer step
    world_size: int  # ranks of the run: processes, or the ranks one process simulates
    ranks_per_process: int = 1  # > 1 only for one process standing in for `world_size` ranks

    @property
    def processes(self) -> int:
        return self.world_size // self.ranks_per_process

    @property
    def micro_steps_per_process(self) -> int:
        """Forward/backward passes each process makes per optimizer step (a simulated rank's run after another's)."""
        return self.gradient_accumulation_steps * self.ranks_per_process

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, over all processes and micro-steps."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def steps_per_epoch(self, n_samples: int) -> int:
        """Optimizer steps per pass over `n_samples`; the last one takes the remainder (a partial window)."""
        return math.ceil(n_samples / self.global_batch_size)

    def total_steps(self, n_samples: int, max_steps: int | None, epochs: int | None) -> int:
        bounds = [b for b in (max_steps, epochs and epochs * self.steps_per_epoch(n_samples)) if b is not None]
        return min(bounds)

    def describe(self) -> str:
        simulated = f" (simulated by one process: {self.micro_steps_per_process} micro-steps)" if self.ranks_per_process > 1 else ""
        return (
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size}"
            f" x accumulation {self.gradient_accumulation_steps} x world size {self.world_size}{simulated}"
        )


def epoch_order(n_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the training samples in `epoch`: the same on every rank and every world size."""
    # 4 bytes a sample held by every rank; shuffling the int32 range in place draws the order permutation(n) does
    order = np.arange(n_samples, dtype=np.int32 if n_samples < 2**31 else np.int64)
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    return order


def step_window(order: np.ndarray, step_in_epoch: int, global_batch_size: int) -> np.ndarray:
    """Sample indices of one optimizer step (fewer than `global_batch_size` at the end of an epoch)."""
    start = step_in_epoch * global_batch_size
    return order[start : start + global_batch_size]


def rank_micro_batches(window: np.ndarray, rank: int, plan: BatchLayout) -> list[np.ndarray]:
    """This rank's share of a window, as exactly `gradient_accumulation_steps` index arrays.

    Ranks take every world_size-th sample, so a partial window spreads evenly; a micro-batch may
    be short or empty (the loader pads it with rows that carry no target tokens), which keeps the
    number of forward/backward passes, and so the collectives, the same on every rank.
    """
    mine = window[rank :: plan.world_size]
    mb = plan.micro_batch_size
    return [mine[k * mb : (k + 1) * mb] for k in range(plan.gradient_accumulation_steps)]
