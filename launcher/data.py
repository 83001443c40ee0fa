"""Text data through HF `datasets`: load, split held-out documents, tokenize (cached), pack into blocks.

Every sample is a fixed-width row of `seq_len + 1` token ids plus its valid `length`; the model
reads `ids[:-1]` and predicts `ids[1:]`. Rows shorter than the width (the end of a document when
`pack` is false, or the tail of a packed chunk) are padded with the tokenizer's pad id, and their
padding carries no target. Tokenizing is cached by `datasets`, keyed by the documents, the
tokenizer's identity (tokenizer.py) and the block layout, so a changed tokenizer never reuses
another's cache.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher
import numpy as np
import torch

from launcher.batches import BatchPlan, epoch_order, rank_micro_batches, step_window
from launcher.config import DataConfig
from launcher.errors import UsageError
from launcher.tokenizer import ByteTokenizer, HFTokenizer  # noqa: F401  (ByteTokenizer: the default, re-exported)

IGNORE_INDEX = -100  # label of positions that are not predicted (padding)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64, IGNORE_INDEX where nothing is predicted

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


@dataclass
class Window:
    """One optimizer step's data on this rank, and the step's target-token count over all ranks."""

    micro_batches: list[Batch]
    global_target_tokens: int


def builtin_corpus_file(cache_dir: Path) -> Path:
    """The CPython documentation topics shipped with Python (pydoc_data) as JSON lines, written once."""
    import pydoc_data.topics

    path = cache_dir / f"pydoc-topics-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"title": k, "text": v}) for k, v in sorted(pydoc_data.topics.topics.items())]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)  # atomic: ranks racing here all see a complete file
    return path


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The documents as a Dataset with one column, `text`."""
    datasets.disable_progress_bars()  # bars would be noise in the log, and around a one-line error
    cache_dir = cfg.cache_dir or Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher"))
    path = cfg.path or builtin_corpus_file(cache_dir)
    builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    field = "text" if builder == "text" else cfg.text_field
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error log of a bad file would be a second line
    try:
        docs = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(cfg.cache_dir) if cfg.cache_dir else None, **kwargs
        )
    except Exception as err:  # the datasets library raises many types for an unreadable file
        if path.suffix == ".jsonl" and (bad := first_bad_json_row(path, field)):
            raise UsageError(f"data.path: '{path}' {bad}") from None
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UsageError(f"data.path: cannot read '{path}' as {builder} ({type(err).__name__}: {reason}); fix the file") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if field not in docs.column_names:
        raise UsageError(
            f"data.text_field: '{path}' has no column '{field}' (columns: {', '.join(docs.column_names)}); set data.text_field"
        )
    check_text_column(docs, field, path)
    return docs.select_columns([field]).rename_column(field, "text") if field != "text" else docs.select_columns(["text"])


def check_text_column(docs: datasets.Dataset, field: str, path: Path) -> None:
    """Every row's text field is a string: name the first row that is null, missing or of another type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = docs.data.table.column(field)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if column.null_count == 0:
            return
        row = pc.index(pc.is_null(column), True).as_py()
        raise UsageError(f"data.path: row {row + 1} of '{path}' has no '{field}' (null or missing); give every row a text"
                         " or remove that row")
    if path.suffix == ".jsonl" and (bad := first_bad_json_row(path, field)):  # the file says what a mixed column became
        raise UsageError(f"data.path: '{path}' {bad}")
    row, value = next(((i, v) for i, v in enumerate(column.to_pylist()) if not isinstance(v, str)), (0, None))
    got = "null or missing" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"
    raise UsageError(f"data.path: row {row + 1} of '{path}': '{field}' is {got}, not text; make it a string"
                     f" (or set data.text_field to the text column)")


def first_bad_json_row(path: Path, field: str) -> str | None:
    """For a JSON-lines file the datasets library could not read: the first line that is not an object
    with a string `field`, described for the error message (None if every line is fine)."""
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number} is not valid JSON ({err.msg}); fix that line"
                value = row.get(field) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    got = "null or missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
                    return f"line {number}: '{field}' is {got}, not text; make it a string (or set data.text_field)"
    except (OSError, UnicodeDecodeError):
        return None
    return None


def split_documents(docs: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out whole documents, so no evaluated text was trained on."""
    if eval_fraction == 0:
        return docs, None
    n_eval = max(1, round(eval_fraction * len(docs)))
    if len(docs) - n_eval < 1:
        raise UsageError(
            f"data.eval_fraction: {len(docs)} document(s) cannot be split into train and eval; add documents or set data.eval_fraction=0"
        )
    split = docs.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


BLOCKS_VERSION = 2  # bump when the block layout changes, so old caches are not reused


def tokenize_into_blocks(docs: datasets.Dataset, seq_len: int, pack: bool,
                         tokenizer: ByteTokenizer | HFTokenizer | None = None) -> datasets.Dataset:
    """Rows of `seq_len + 1` token ids (padded) and their valid `length`; rows with no target are dropped."""
    tokenizer = tokenizer or ByteTokenizer()
    width, pad_id = seq_len + 1, tokenizer.pad_id

    def to_blocks(batch):
        streams = tokenizer.encode_documents(batch["text"])  # batched: the fast tokenizer works on 1000 at once
        if pack:  # one stream per map batch: blocks cross document boundaries
            streams = [[t for s in streams for t in s]]
        rows, lengths = [], []
        for stream in streams:
            for start in range(0, len(stream), width):
                block = stream[start : start + width]
                if len(block) >= 2:
                    lengths.append(len(block))
                    rows.append(block + [pad_id] * (width - len(block)))
        return {"input_ids": rows, "length": lengths}

    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32"), length=width), "length": datasets.Value("int32")}
    )
    fingerprint = Hasher.hash((docs._fingerprint, tokenizer.identity, seq_len, pack, BLOCKS_VERSION))
    blocks = docs.map(to_blocks, batched=True, batch_size=1000, remove_columns=docs.column_names, features=features,
                      new_fingerprint=fingerprint)
    return blocks.with_format("numpy")


def rows_to_batch(rows: dict, n_rows: int, width: int, pin: bool, pad_id: int = 0) -> Batch:
    """Inputs and next-token labels as `n_rows` rows; rows beyond the data are padding with no targets."""
    ids, lengths = rows["input_ids"], rows["length"]
    full = np.full((n_rows, width), pad_id, dtype=np.int64)
    full[: len(ids)] = ids
    valid = np.zeros((n_rows, 1), dtype=np.int64)
    valid[: len(ids), 0] = lengths
    targets = full[:, 1:].copy()
    targets[np.arange(width - 1)[None, :] >= valid - 1] = IGNORE_INDEX
    inputs, labels = torch.from_numpy(full[:, :-1].copy()), torch.from_numpy(targets)
    if pin:  # page-locked host memory lets the copy to the GPU run asynchronously
        inputs, labels = inputs.pin_memory(), labels.pin_memory()
    return Batch(inputs, labels)


def sample_lengths(blocks: datasets.Dataset) -> np.ndarray:
    """Valid tokens per row (a row predicts length - 1 targets)."""
    return np.asarray(blocks.select_columns(["length"])[:]["length"], dtype=np.int64)


class RowStore:
    """Rows of a tokenized split as zero-copy numpy views of its Arrow chunks (memory-mapped from the
    datasets cache): gathering a micro-batch costs microseconds and no copy of the whole split."""

    def __init__(self, blocks: datasets.Dataset, pad_id: int = 0):
        self.pad_id = pad_id  # fills the rows of a micro-batch beyond the data
        if blocks._indices is not None:  # a selected or shuffled view: materialize it once
            blocks = blocks.flatten_indices()
        self.width = blocks.features["input_ids"].length
        chunks = blocks.data.table.column("input_ids").chunks
        self.chunks = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.width) for c in chunks]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self.lengths = sample_lengths(blocks)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, idx: np.ndarray) -> dict:
        ids = np.empty((len(idx), self.width), dtype=np.int32)
        chunk_of = np.searchsorted(self.starts, idx, side="right") - 1
        for i, (row, chunk) in enumerate(zip(idx, chunk_of)):
            ids[i] = self.chunks[chunk][row - self.starts[chunk]]
        return {"input_ids": ids, "length": self.lengths[idx]}


class TrainData:
    """This rank's micro-batches for any optimizer step, computed from the step alone (O(1) to seek)."""

    def __init__(self, blocks: datasets.Dataset, plan: BatchPlan, process_index: int, seed: int, shuffle: bool, pin: bool,
                 overfit_batches: int | None = None, pad_id: int = 0):
        self.store, self.plan, self.seed, self.shuffle, self.pin = RowStore(blocks, pad_id), plan, seed, shuffle, pin
        # the ranks this process plays: its own, or all of them one after the other when simulating
        self.ranks = range(process_index * plan.ranks_per_process, (process_index + 1) * plan.ranks_per_process)
        self.target_counts = self.store.lengths - 1
        self.steps_per_epoch = plan.steps_per_epoch(len(self.store))
        self.overfit_batches = overfit_batches
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.store)

    def window(self, step: int) -> Window:
        """Micro-batches of optimizer step `step` for the ranks this process plays (rank by rank), and the
        number of target tokens of the whole global batch."""
        if self.overfit_batches:  # the first N steps' batches, over and over
            step = step % min(self.overfit_batches, self.steps_per_epoch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(len(self.store), self.seed, epoch, self.shuffle)
        window = step_window(self._order, step_in_epoch, self.plan.global_batch_size)
        micro = [
            rows_to_batch(self.store.rows(idx), self.plan.micro_batch_size, self.store.width, self.pin, self.store.pad_id)
            for rank in self.ranks
            for idx in rank_micro_batches(window, rank, self.plan)
        ]
        return Window(micro, int(self.target_counts[window].sum()))


class EvalData:
    """The held-out samples sharded over ranks without duplicates; every rank runs the same number of batches."""

    def __init__(self, blocks: datasets.Dataset, rank: int, world_size: int, micro_batch_size: int, max_samples: int | None, pin: bool,
                 pad_id: int = 0):
        n = min(len(blocks), max_samples or len(blocks))
        self.store, self.micro_batch_size, self.pin = RowStore(blocks, pad_id), micro_batch_size, pin
        self.target_tokens = int((self.store.lengths[:n] - 1).sum())  # all ranks: the loss denominator
        self.mine = np.arange(rank, n, world_size)
        per_rank = -(-n // world_size)
        self.n_batches = -(-per_rank // micro_batch_size)

    def __iter__(self):
        mb = self.micro_batch_size
        for b in range(self.n_batches):
            idx = self.mine[b * mb : (b + 1) * mb]
            yield rows_to_batch(self.store.rows(idx), mb, self.store.width, self.pin, self.store.pad_id)


def prepare_splits(cfg: DataConfig, seed: int, tokenizer: ByteTokenizer | HFTokenizer | None = None
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Tokenized training and held-out blocks (the held-out split is None when data.eval_fraction is 0)."""
    datasets.disable_progress_bars()
    train_docs, eval_docs = split_documents(load_documents(cfg), cfg.eval_fraction, seed)
    train_blocks = tokenize_into_blocks(train_docs, cfg.seq_len, cfg.pack, tokenizer)
    if len(train_blocks) == 0:
        raise UsageError("data.path: the training split has no text; use a larger file or a smaller data.eval_fraction")
    eval_blocks = tokenize_into_blocks(eval_docs, cfg.seq_len, cfg.pack, tokenizer) if eval_docs is not None else None
    return train_blocks, eval_blocks
