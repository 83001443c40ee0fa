"""Rows into batches: the memory-mapped rows of a tokenized split, and each step's micro-batches per rank.

The loop sees `input_ids`, `labels` (IGNORE_INDEX where nothing is predicted) and, for rows packed
with several samples of a masked format, `position_ids` that restart at each sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
import torch

from launcher.batches import BatchLayout, epoch_order, order_kind, rank_micro_batches, step_window
from launcher.data.formats import START, TARGET
from launcher.data.mixture import Mixture
from launcher.data.tokens import TokenRows

IGNORE_INDEX = -100  # label of positions that are not predicted (padding, prompts, non-assistant turns)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64, IGNORE_INDEX where nothing is predicted
    position_ids: torch.Tensor | None = None  # [rows, seq_len] int64 for rows packed with several samples; else None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids))


@dataclass
class Window:
    """One optimizer step's data on this rank, and the step's target-token count over all ranks."""

    micro_batches: list[Batch]
    global_target_tokens: int


def rows_to_batch(rows: dict, n_rows: int, width: int, pin: bool, pad_id: int = 0) -> Batch:
    """Inputs and next-token labels as `n_rows` rows; rows beyond the data are padding with no targets.
    With `kinds` (masked formats), only TARGET ids are labels; a micro-batch with a row of several samples
    gets position ids that restart at each sample's START."""
    ids, lengths = rows["input_ids"], rows["length"]
    full = np.full((n_rows, width), pad_id, dtype=np.int64)
    full[: len(ids)] = ids
    targets = full[:, 1:].copy()
    position_ids = None
    if "kinds" in rows:
        kinds = np.zeros((n_rows, width), dtype=np.uint8)
        kinds[: len(ids)] = rows["kinds"]
        targets[kinds[:, 1:] != TARGET] = IGNORE_INDEX
        starts = kinds[:, :-1] == START
        if starts[:, 1:].any():  # some row holds more than one sample
            index = np.arange(width - 1)[None, :]
            last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
            position_ids = torch.from_numpy(index - last_start)
    else:
        valid = np.zeros((n_rows, 1), dtype=np.int64)
        valid[: len(ids), 0] = lengths
        targets[np.arange(width - 1)[None, :] >= valid - 1] = IGNORE_INDEX
    inputs, labels = torch.from_numpy(full[:, :-1].copy()), torch.from_numpy(targets)
    if pin:  # page-locked host memory lets the copy to the GPU run asynchronously
        inputs, labels = inputs.pin_memory(), labels.pin_memory()
        position_ids = position_ids.pin_memory() if position_ids is not None else None
    return Batch(inputs, labels, position_ids)


def sample_lengths(blocks: datasets.Dataset) -> np.ndarray:
    """Valid tokens per row."""
    return np.asarray(blocks.select_columns(["length"])[:]["length"], dtype=np.int64)


def target_counts(blocks: datasets.Dataset | TokenRows) -> np.ndarray:
    """Target tokens per row: the label positions that are not IGNORE_INDEX."""
    if isinstance(blocks, TokenRows):  # computed per row asked for (its .sum(): all rows')
        return blocks.target_counts
    return np.asarray(blocks.select_columns(["n_targets"])[:]["n_targets"], dtype=np.int64)


class RowStore:
    """Rows of a tokenized split as zero-copy numpy views of its Arrow chunks (memory-mapped from the
    datasets cache): gathering a micro-batch costs microseconds and no copy of the whole split."""

    def __init__(self, blocks: datasets.Dataset, pad_id: int = 0):
        self.pad_id = pad_id  # fills the rows of a micro-batch beyond the data
        if blocks._indices is not None:  # a selected or shuffled view: materialize it once
            blocks = blocks.flatten_indices()
        self.width = blocks.features["input_ids"].length
        self.columns = {name: self.views(blocks, name) for name in ("input_ids", "kinds") if name in blocks.column_names}
        self.starts = np.cumsum([0] + [len(c) for c in self.columns["input_ids"]])
        # read in place too: a rank holds nothing per row of the corpus (batches.order_kind: nor per sample, above 2^20)
        self.lengths = MappedColumn(blocks.data.table.column("length"))
        self.target_counts = MappedColumn(blocks.data.table.column("n_targets"))

    def views(self, blocks: datasets.Dataset, name: str) -> list[np.ndarray]:
        return [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.width) for c in blocks.data.table.column(name).chunks]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, idx: np.ndarray) -> dict:
        chunk_of = np.searchsorted(self.starts, idx, side="right") - 1
        out = {"length": self.lengths[idx]}
        for name, chunks in self.columns.items():
            rows = np.empty((len(idx), self.width), dtype=chunks[0].dtype)
            for i, (row, chunk) in enumerate(zip(idx, chunk_of)):
                rows[i] = chunks[chunk][row - self.starts[chunk]]
            out[name] = rows
        return out


class MappedColumn:
    """A number per row (a length, a target count) read where the split's Arrow chunks lie, memory-mapped from the
    cache: a numpy view and 8 bytes per chunk of about 1,000 rows are held (a few hundred bytes), not 4 bytes per row."""

    def __init__(self, column):
        self.chunks = [c.to_numpy(zero_copy_only=True) for c in column.chunks]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx) -> np.ndarray | int:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        if np.ndim(idx) == 0:  # one row's number
            return int(self[np.array([idx])][0])
        idx = np.asarray(idx, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        chunk = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(len(idx), dtype=np.int64)
        for c in np.unique(chunk):
            mine = chunk == c
            out[mine] = self.chunks[c][idx[mine] - self.starts[c]]
        return out

    def __iter__(self):
        return (int(v) for chunk in self.chunks for v in chunk)

    def sum(self) -> int:
        return sum(int(c.sum(dtype=np.int64)) for c in self.chunks)


def row_store(blocks: datasets.Dataset | TokenRows, pad_id: int) -> RowStore | TokenRows:
    """Token shards (format tokens) are their own store: memory-mapped, located per row."""
    return blocks if isinstance(blocks, TokenRows) else RowStore(blocks, pad_id)


class TrainData:
    """This rank's micro-batches for any optimizer step, computed from the step alone (O(1) to seek)."""

    def __init__(
        self,
        blocks: datasets.Dataset,
        plan: BatchLayout,
        process_index: int,
        seed: int,
        shuffle: bool,
        pin: bool,
        overfit_batches: int | None = None,
        pad_id: int = 0,
        mixture: Mixture | None = None,
        sample_order: str | None = None,
    ):
        self.store, self.plan, self.seed, self.shuffle, self.pin = row_store(blocks, pad_id), plan, seed, shuffle, pin
        self.mixture = mixture  # data.sources: its epochs replace the plain permutation of the rows
        # the ranks this process plays: its own, or all of them one after the other when simulating
        self.ranks = range(process_index * plan.ranks_per_process, (process_index + 1) * plan.ranks_per_process)
        self.target_counts = self.store.target_counts
        self.steps_per_epoch = plan.steps_per_epoch(len(self))
        # how epochs are ordered (batches.order_kind): a resumed run's as its checkpoint recorded, else by the size
        self.sample_order = sample_order or order_kind(len(self))
        self.overfit_batches = overfit_batches
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.mixture.epoch_size if self.mixture is not None else len(self.store)

    def window(self, step: int) -> Window:
        """Micro-batches of optimizer step `step` for the ranks this process plays (rank by rank), and the
        number of target tokens of the whole global batch."""
        if self.overfit_batches:  # the first N steps' batches, over and over
            step = step % min(self.overfit_batches, self.steps_per_epoch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            order = (
                self.mixture.epoch_order(epoch)
                if self.mixture is not None
                else epoch_order(len(self.store), self.seed, epoch, self.shuffle, self.sample_order)
            )
            self._epoch, self._order = epoch, order
        window = step_window(self._order, step_in_epoch, self.plan.global_batch_size)
        if self.mixture is not None:
            self.mixture.record(window)
        micro = [
            rows_to_batch(self.store.rows(idx), self.plan.micro_batch_size, self.store.width, self.pin, self.store.pad_id)
            for rank in self.ranks
            for idx in rank_micro_batches(window, rank, self.plan)
        ]
        return Window(micro, int(self.target_counts[window].sum()))


class EvalData:
    """The held-out samples sharded over ranks without duplicates; every rank runs the same number of batches."""

    def __init__(
        self, blocks: datasets.Dataset, rank: int, world_size: int, micro_batch_size: int, max_samples: int | None, pin: bool, pad_id: int = 0
    ):
        n = min(len(blocks), max_samples or len(blocks))
        self.store, self.micro_batch_size, self.pin = row_store(blocks, pad_id), micro_batch_size, pin
        self.target_tokens = int(self.store.target_counts[:n].sum())  # all ranks: the loss denominator
        self.mine = np.arange(rank, n, world_size)
        per_rank = -(-n // world_size)
        self.n_batches = -(-per_rank // micro_batch_size)

    def __iter__(self):
        mb = self.micro_batch_size
        for b in range(self.n_batches):
            idx = self.mine[b * mb : (b + 1) * mb]
            yield rows_to_batch(self.store.rows(idx), mb, self.store.width, self.pin, self.store.pad_id)
