"""data.sources: a mixture of several sources, each tokenized on its own (and cached as a data.path would be),
sampled with weights (each source's share of the target tokens) or with epochs (passes over each source).

An epoch of the mixture is `c_i` rows of each source `i`:
- epochs: `c_i = round(epochs_i * n_i)` (`n_i` rows in source i);
- weights: as many rows as all sources hold, `sum n_i`, split so that source i's expected share of the target
  tokens is `w_i / sum w` (its rows' share is `w_i / mean_targets_i`, normalized; largest remainders round).
Source i's rows are drawn from an endless stream of seeded passes over it (a new permutation per pass), epoch
`e` taking stream positions `[e * c_i, (e + 1) * c_i)`: a source sampled above its size repeats a row only once
every row was seen, one below sees new rows in the next epoch. The epoch's rows are then shuffled together
(seed, epoch), or without data.shuffle interleaved evenly. Like the plain order (batches.py), an epoch's order
depends on the seed, the epoch and the data only: any step's window is computed directly, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np

from launcher.config import DataConfig
from launcher.data.formats import CONTEXT, START, TARGET

SOURCE_COLUMN = "source"  # the index of the source of each row of a mixture's training and evaluation rows
STREAM_TAG = 7_340_033  # apart from batches.epoch_order's [seed, epoch]: a source pass's permutation has its own seeds


def source_config(cfg: DataConfig, index: int) -> DataConfig:
    """The data config of one source alone: data.* with the keys the source sets for itself (validated in config.py)."""
    source = cfg.sources[index]
    return cfg.model_copy(
        update={
            **source.data_keys,
            "sources": None,
            "eval_path": None,  # a mixture's evaluation set, if given, is read once for all sources
            "eval_fraction": cfg.eval_fraction if cfg.eval_path is None else 0.0,
        }
    )


def source_name(cfg: DataConfig, index: int) -> str:
    return f"data.sources.{index} '{cfg.sources[index].path}'"


def mixture_splits(cfg: DataConfig, prepare: Callable) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training (and evaluation) rows of every source, one after the other, each row tagged with its source.
    `prepare(cfg)`: the training and evaluation rows of a one-source config (data.prepare_splits)."""
    trains, evals = [], []
    for i in range(len(cfg.sources)):
        train, held_out = prepare(source_config(cfg, i))
        trains.append(train)
        evals.append(held_out)
    train = tagged(trains)
    if cfg.eval_path is not None:
        eval_cfg = cfg.model_copy(update={"sources": None, "path": cfg.eval_path, "eval_path": None, "eval_fraction": 0.0})
        return train, prepare(eval_cfg)[0]
    return train, tagged(evals) if all(e is not None for e in evals) else None


def tagged(parts: list[datasets.Dataset]) -> datasets.Dataset:
    """The sources' rows concatenated with a `source` column; text rows get `kinds` when other sources have them
    (START, then TARGET over the valid ids: the same labels as the text layout gives; kept in memory, 1 byte a token)."""
    if any("kinds" in p.column_names for p in parts):
        parts = [p if "kinds" in p.column_names else p.map(text_kinds, batched=True, keep_in_memory=True) for p in parts]
        parts = [p.cast_column("kinds", next(q for q in parts if "kinds" in q.column_names).features["kinds"]) for p in parts]
    rows = datasets.concatenate_datasets([p.select_columns(sorted(p.column_names)) for p in parts])
    source = np.concatenate([np.full(len(p), i, dtype=np.int16) for i, p in enumerate(parts)])
    return rows.add_column(SOURCE_COLUMN, source).with_format("numpy")


def text_kinds(batch: dict) -> dict:
    ids, lengths = np.asarray(batch["input_ids"]), np.asarray(batch["length"])
    positions = np.arange(ids.shape[1])[None, :]
    kinds = np.where(positions < lengths[:, None], TARGET, CONTEXT).astype(np.uint8)
    kinds[:, 0] = START
    return {"kinds": kinds}


class Mixture:
    """Which rows make each epoch of a mixture; what its steps sampled so far, per source."""

    def __init__(self, cfg: DataConfig, source_of_row: np.ndarray, target_counts: np.ndarray, seed: int, shuffle: bool):
        self.names = [source_name(cfg, i) for i in range(len(cfg.sources))]
        self.seed, self.shuffle, self.source_of_row, self.target_counts = seed, shuffle, source_of_row, target_counts
        k = len(self.names)
        self.n_rows = np.bincount(source_of_row, minlength=k)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_rows)[:-1]])
        self.mean_targets = np.bincount(source_of_row, weights=target_counts, minlength=k) / self.n_rows
        if cfg.sources[0].epochs is not None:
            self.per_epoch = np.maximum(1, np.round([s.epochs * n for s, n in zip(cfg.sources, self.n_rows)])).astype(np.int64)
            self.shares = None
        else:
            weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
            self.shares = weights / weights.sum()  # of the target tokens
            self.per_epoch = largest_remainder(int(self.n_rows.sum()), self.shares / self.mean_targets)
        self.sampled_tokens = np.zeros(k, dtype=np.int64)  # target tokens of the steps sampled by this process so far

    @property
    def epoch_size(self) -> int:
        return int(self.per_epoch.sum())

    @property
    def target_tokens_per_epoch(self) -> int:
        """Expected: an epoch's rows of each source times the mean target tokens of that source's rows."""
        return int(round(float((self.per_epoch * self.mean_targets).sum())))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices of the epoch, in the order its steps take them."""
        parts = [self.offsets[i] + self.stream(i, epoch * c, (epoch + 1) * c) for i, c in enumerate(self.per_epoch)]
        rows = np.concatenate(parts)
        if self.shuffle:
            return rows[np.random.default_rng([self.seed, epoch]).permutation(len(rows))]
        # evenly interleaved: each source's rows at the fractions (j + 0.5) / c_i of the epoch
        places = np.concatenate([(np.arange(c) + 0.5) / c for c in self.per_epoch])
        return rows[np.argsort(places, kind="stable")]

    def stream(self, source: int, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of the source's endless stream of passes (rows within the source)."""
        n = int(self.n_rows[source])
        first, last = start // n, (stop - 1) // n
        passes = [self.one_pass(source, p) for p in range(first, last + 1)]
        return np.concatenate(passes)[start - first * n : stop - first * n]

    def one_pass(self, source: int, number: int) -> np.ndarray:
        n = int(self.n_rows[source])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, STREAM_TAG, source + 1, number + 1]).permutation(n)

    def record(self, window: np.ndarray) -> None:
        """Count a step's target tokens by source (a step the loop takes once)."""
        self.sampled_tokens += np.bincount(self.source_of_row[window], weights=self.target_counts[window], minlength=len(self.names)).astype(np.int64)

    def describe(self) -> str:
        """The plan, at start: each source's rows, rows per epoch and expected share of the target tokens."""
        expected = self.per_epoch * self.mean_targets / (self.per_epoch * self.mean_targets).sum()
        parts = [
            f"{name} ({'weight ' + format(self.shares[i] * 100, '.1f') + '%, ' if self.shares is not None else ''}"
            f"{self.n_rows[i]} rows, {self.per_epoch[i]} per epoch: {expected[i] * 100:.1f}% of target tokens)"
            for i, name in enumerate(self.names)
        ]
        return f"data: mixture of {len(self.names)} sources, {self.epoch_size} rows per epoch: " + "; ".join(parts)

    def sampled(self) -> dict[str, float]:
        """Each source's share of the target tokens this process's steps sampled."""
        total = self.sampled_tokens.sum()
        return {name: float(n / total) if total else 0.0 for name, n in zip(self.names, self.sampled_tokens)}

    def describe_sampled(self, steps: str) -> str:
        """What was sampled, against the plan (the check that the weights took effect)."""
        expected = self.per_epoch * self.mean_targets / (self.per_epoch * self.mean_targets).sum()
        shares = self.sampled()
        parts = [f"{name} {shares[name] * 100:.1f}% (planned {expected[i] * 100:.1f}%)" for i, name in enumerate(self.names)]
        return f"data: mixture sampled over {steps}, of {int(self.sampled_tokens.sum())} target tokens: " + "; ".join(parts)


def largest_remainder(total: int, proportions: np.ndarray) -> np.ndarray:
    """`total` split in integers in the given proportions (each at least 1); the remainders go to the largest fractions."""
    exact = total * proportions / proportions.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return np.maximum(counts, 1)


def make_mixture(cfg: DataConfig, train_rows: datasets.Dataset, seed: int) -> Mixture | None:
    """The mixture of data.sources over the training rows mixture_splits made; None for one source."""
    if cfg.sources is None:
        return None
    columns = train_rows.select_columns([SOURCE_COLUMN, "n_targets"])[:]
    source_of_row = np.asarray(columns[SOURCE_COLUMN], dtype=np.int64)
    return Mixture(cfg, source_of_row, np.asarray(columns["n_targets"], dtype=np.int64), seed, cfg.shuffle)
