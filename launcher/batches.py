"""Batch arithmetic and which samples make up each optimizer step.

The samples of global step `s` are a slice of a seeded per-epoch permutation of the training split (an
array, or for large splits a permutation computed per slice: `order_kind`), `global_batch_size` long
(shorter for the last step of an epoch). They depend on the seed, the
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


ARRAY_ORDER_MAX = 1 << 20  # epochs up to this many samples are ordered by a shuffled array (4 MiB, about 40 ms at most)
ORDER_KINDS = ("array", "keyed")  # recorded in checkpoints (TrainerState.sample_order): a resume keeps its run's


def order_kind(n_samples: int) -> str:
    """How the samples of an epoch are ordered: a shuffled array (4 bytes a sample on every rank) up to
    ARRAY_ORDER_MAX samples; above, a keyed permutation computed per step (KeyedOrder), whatever the size."""
    return "array" if n_samples <= ARRAY_ORDER_MAX else "keyed"


def epoch_order(n_samples: int, seed: int, epoch: int, shuffle: bool, kind: str = "array") -> np.ndarray | KeyedOrder:
    """The order of the training samples in `epoch`: the same on every rank and every world size; sliced by step."""
    if kind == "keyed":
        return KeyedOrder(n_samples, seed, epoch, shuffle)
    # 4 bytes a sample held by every rank; shuffling the int32 range in place draws the order permutation(n) does
    order = np.arange(n_samples, dtype=np.int32 if n_samples < 2**31 else np.int64)
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    return order


class KeyedOrder:
    """A permutation of range(n) drawn from (seed, epoch), computed for the positions asked for: nothing is held per
    sample, and a step's window costs its own length, whatever n (a corpus of billions of rows starts as fast as a
    small one). A Feistel network of ROUNDS rounds is a bijection on the 2^(2h) values of h-bit halves (2^(2h) >= n,
    under 4n); a value that lands at n or above is enciphered again until it falls below n (cycle walking, under 4
    times on average), which keeps it a bijection on range(n)."""

    ROUNDS = 6
    TAG = 0x5EED_0DE5  # apart from the array order's [seed, epoch] and the mixture's streams

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool):
        self.n, self.shuffle = n, shuffle
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.keys = np.random.default_rng([seed, epoch, self.TAG]).integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, positions: slice) -> np.ndarray:
        idx = np.arange(*positions.indices(self.n), dtype=np.uint64)
        if not self.shuffle:
            return idx.astype(np.int64)
        out = self.encipher(idx)
        while (walk := out >= self.n).any():
            out[walk] = self.encipher(out[walk])
        return out.astype(np.int64)

    def encipher(self, x: np.ndarray) -> np.ndarray:
        h, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        for key in self.keys:
            left, right = right, left ^ (mix(right ^ key) & mask)
        return (left << h) | right


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def step_window(order: np.ndarray | KeyedOrder, step_in_epoch: int, global_batch_size: int) -> np.ndarray:
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
