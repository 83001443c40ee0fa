"""Tokenize (in parallel, cached) and lay samples out in fixed-width rows (cached).

Stage 1 turns each row into one sample (formats.py) with `data.num_proc` processes; stage 2 lays the
samples out in rows of `seq_len + 1` ids, in one process, in groups of 1,000 samples, so the rows
never depend on the number of processes. Both stages are `datasets` caches keyed by what decides
their output, written under the launcher's cache folder (never beside the source); each entry gets a
manifest of its files' sizes and digests once complete (identity.py), checked before it is read.

A row has `input_ids` (padded with the tokenizer's pad id), `length` (valid ids), `n_targets` (the
ids the loss counts) and, for masked formats, `kinds` (formats.py; padding is CONTEXT).
- text: packed, documents are concatenated and cut into full rows (the last one of each group of
  1,000 documents may be short); unpacked, each document is cut into rows of its own. Positions
  run on across documents, as in GPT-2 pretraining; with `data.separate_documents` a packed row gets
  `kinds` too: START where the row and each document in it begin (no target: positions restart there
  and attention stays within the document), TARGET on every other id.
- prompt_completion, chat: a sample longer than a row is truncated (its end cut off) or dropped
  (`data.too_long`); a sample left with no target is dropped. Packed, whole samples fill a row in
  order while they fit (a START kind marks where each begins); unpacked, one sample per padded row.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher

from launcher.data.formats import CONTEXT, START, TARGET, Encoder
from launcher.data.identity import check_entry, commit_entry, entry_files, manifest_path, remove_entry
from launcher.errors import UsageError

LAYOUT_VERSION = 3  # bump when the samples or rows change, so old caches are not reused
GROUP = 1000  # samples per stage-2 group (and per tokenizer call)


@dataclass
class SampleCounts:
    samples: int = 0
    truncated: int = 0  # cut to fit a row, targets left
    dropped_too_long: int = 0  # longer than a row under too_long: drop
    dropped_no_target: int = 0  # no target token within the row
    no_target: int = 0  # no target token at all (before any cut)
    all_targets: int = 0  # every token a target but the first
    tokens: int = 0  # in all samples, before any cut
    targets: int = 0

    def describe(self, what: str) -> str | None:
        if not (self.truncated or self.dropped_too_long or self.dropped_no_target):
            return None
        parts = [f"{self.truncated} truncated to seq_len + 1 tokens"] if self.truncated else []
        parts += [f"{self.dropped_too_long} dropped as longer than seq_len + 1 tokens"] if self.dropped_too_long else []
        parts += [f"{self.dropped_no_target} dropped with no target token left"] if self.dropped_no_target else []
        return f"data: {what}: of {self.samples} samples, {', '.join(parts)}"


def default_num_proc(n_rows: int) -> int:
    return 1 if n_rows < 10_000 else max(1, min(8, len(os.sched_getaffinity(0))))


def cache_file(docs: datasets.Dataset, cache_dir: Path | None, fingerprint: str, report: Callable[[str], None] | None, shards: int = 1) -> str | None:
    """Where a stage's output goes: a file under the cache folder for sources read from disk; in memory otherwise.
    An entry there that is not as it was written (truncated, other bytes, no manifest) is removed, with a warning
    naming the file, so the stage builds it again instead of reading it; except the finished shards of an
    interrupted build of `shards` processes, which are kept (datasets renames a shard into place once written)
    and read, while the missing ones are made."""
    if not docs.cache_files or cache_dir is None:
        return None
    (cache_dir / "tokenized").mkdir(parents=True, exist_ok=True)
    entry = cache_dir / "tokenized" / f"{fingerprint}.arrow"
    if (problem := check_entry(entry)) is not None:
        if (finished := finished_shards(entry, shards)) is not None:
            (report or warn)(f"data: resuming the tokenization of '{entry.name}': {finished} of {shards} shards were finished")
        else:
            (report or warn)(f"data: the tokenized cache file {problem}; building it again")
            remove_entry(entry)
    return str(entry)


def finished_shards(entry: Path, shards: int) -> int | None:
    """How many shards an interrupted build of `shards` processes finished (no manifest yet, every file a shard of
    that many); None when the entry is anything else."""
    files = entry_files(entry)
    names = {f"{entry.stem}_{rank:05d}_of_{shards:05d}.arrow" for rank in range(shards)}
    if shards < 2 or manifest_path(entry).exists() or not files or any(f.name not in names for f in files):
        return None
    return len(files)


def rows_fingerprint(samples_fingerprint: str, width: int, pack: bool, too_long: str | None, pad_id: int, separate: bool = False) -> str:
    """The cache key of stage 2 (`too_long`: None for format text; `separate`: data.separate_documents, format text)."""
    key = (samples_fingerprint, width, pack, too_long, pad_id, LAYOUT_VERSION)
    return Hasher.hash(key + ("separate",) if separate else key)  # rows made before the key existed keep their entries


def samples_fingerprint(docs: datasets.Dataset, encoder: Encoder) -> str:
    """The cache key of stage 1."""
    return Hasher.hash((docs._fingerprint, encoder.identity, LAYOUT_VERSION))


def cached_rows(
    docs: datasets.Dataset, encoder: Encoder, seq_len: int, pack: bool, too_long: str, pad_id: int, cache_dir: Path | None, separate: bool = False
):
    """Stage 2's output when its cache entry is complete: a start reads neither stage 1 nor the samples (whatever
    data.num_proc made them, e.g. `launcher tokenize --num-proc`); None otherwise."""
    if not docs.cache_files or cache_dir is None:
        return None
    masked = encoder.format != "text"
    key = rows_fingerprint(
        samples_fingerprint(docs, encoder), seq_len + 1, pack, too_long if masked else None, pad_id, separate and pack and not masked
    )
    entry = cache_dir / "tokenized" / f"{key}.arrow"
    if not manifest_path(entry).is_file() or check_entry(entry) is not None or entry_files(entry) != [entry]:
        return None
    return datasets.Dataset.from_file(str(entry)).with_format("numpy")


def committed(result: datasets.Dataset, cache_file_name: str | None) -> datasets.Dataset:
    """A stage's output, with the manifest of its cache entry written once the entry is complete (a hit has one)."""
    if cache_file_name is not None and not manifest_path(Path(cache_file_name)).is_file():
        commit_entry(Path(cache_file_name))
    return result


def warn(line: str) -> None:
    print(line, file=sys.stderr)


def tokenize_samples(
    docs: datasets.Dataset, encoder: Encoder, num_proc: int | None, cache_dir: Path | None, report: Callable[[str], None] | None = None
) -> datasets.Dataset:
    """Stage 1: one sample per row, with its length and first target (for stage 2's counts)."""
    masked = encoder.format != "text"
    features = {"ids": datasets.Sequence(datasets.Value("int32"))}
    if masked:
        features["kinds"] = datasets.Sequence(datasets.Value("uint8"))
    fingerprint = samples_fingerprint(docs, encoder)
    procs = min(num_proc or default_num_proc(len(docs)), max(1, len(docs)))
    cache_file_name = cache_file(docs, cache_dir, fingerprint, report, procs)
    try:
        samples = docs.map(
            encoder,
            batched=True,
            batch_size=GROUP,
            remove_columns=docs.column_names,
            features=datasets.Features(features),
            new_fingerprint=fingerprint,
            num_proc=procs if procs > 1 else None,
            cache_file_name=cache_file_name,
        )
    except UsageError:
        raise
    except Exception as err:  # a UsageError raised in a worker process comes back wrapped
        cause = err
        while cause is not None and not isinstance(cause, UsageError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UsageError(*cause.lines) from None
        raise
    return committed(samples, cache_file_name)


def count_samples(samples: datasets.Dataset, width: int, too_long: str) -> SampleCounts:
    """What stage 2 will truncate and drop, from the kinds alone (masked formats), a group of samples at a time."""
    counts = SampleCounts(samples=len(samples))
    for table in samples.select_columns(["kinds"]).with_format("arrow").iter(batch_size=10 * GROUP):
        kinds = table.column("kinds").combine_chunks()
        offsets = kinds.offsets.to_numpy()
        flat = kinds.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
        kept = np.concatenate([[0], np.cumsum((flat == TARGET) & (position < width))])
        targets_kept = kept[offsets[1:]] - kept[offsets[:-1]]  # targets within the first `width` tokens
        every = np.concatenate([[0], np.cumsum(flat == TARGET)])
        targets = every[offsets[1:]] - every[offsets[:-1]]
        counts.no_target += int((targets == 0).sum())
        counts.tokens, counts.targets = counts.tokens + len(flat), counts.targets + int(every[-1])
        counts.all_targets += int(((targets == lengths - 1) & (lengths > 1)).sum())
        too_long_mask = lengths > width
        if too_long == "drop":
            counts.dropped_too_long += int(too_long_mask.sum())
            counts.dropped_no_target += int(((targets_kept == 0) & ~too_long_mask).sum())
        else:
            counts.dropped_no_target += int((targets_kept == 0).sum())
            counts.truncated += int((too_long_mask & (targets_kept > 0)).sum())
    return counts


def layout_rows(
    samples: datasets.Dataset,
    seq_len: int,
    pack: bool,
    too_long: str,
    pad_id: int,
    cache_dir: Path | None,
    report: Callable[[str], None] | None = None,
    separate: bool = False,
) -> datasets.Dataset:
    """Stage 2: rows of `seq_len + 1` ids; rows with no target are dropped. `separate`: data.separate_documents (format
    text, packed): the rows get kinds marking where each document starts."""
    width = seq_len + 1
    masked = "kinds" in samples.column_names
    separate = separate and pack and not masked
    features = {
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=width),
        "length": datasets.Value("int32"),
        "n_targets": datasets.Value("int32"),
    }
    if masked or separate:
        features["kinds"] = datasets.Sequence(datasets.Value("uint8"), length=width)
    fingerprint = rows_fingerprint(samples._fingerprint, width, pack, too_long if masked else None, pad_id, separate)

    def rows_of_group(table: pa.Table) -> pa.Table:
        ids = table.column("ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        values = ids.flatten().to_numpy(zero_copy_only=False)
        kinds = table.column("kinds").combine_chunks().flatten().to_numpy(zero_copy_only=False) if masked else None
        pieces = [(values[a:b], kinds[a:b] if masked else None) for a, b in zip(offsets[:-1], offsets[1:])]
        rows = masked_rows(pieces, width, pack, too_long) if masked else text_rows(pieces, width, pack, separate)
        return to_table(rows, width, pad_id, masked or separate)

    cache_file_name = cache_file(samples, cache_dir, fingerprint, report)
    rows = (
        samples.with_format("arrow")
        .map(
            rows_of_group,
            batched=True,
            batch_size=GROUP,
            remove_columns=samples.column_names,
            features=datasets.Features(features),
            new_fingerprint=fingerprint,
            cache_file_name=cache_file_name,
        )
        .with_format("numpy")
    )
    return committed(rows, cache_file_name)


def text_rows(pieces: list, width: int, pack: bool, separate: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Rows of `width` ids (a stream's last row may be shorter; a tail of one id has no target and is left out);
    `separate`: each with its kinds, START where the row and each document in it begin, TARGET elsewhere."""
    streams = [np.concatenate([ids for ids, _ in pieces])] if pack and pieces else [ids for ids, _ in pieces]
    kinds = None
    if separate and pieces:
        kinds = np.full(len(streams[0]), TARGET, dtype=np.uint8)
        starts = np.cumsum([0] + [len(ids) for ids, _ in pieces[:-1]])
        kinds[starts[starts < len(kinds)]] = START  # empty documents start nowhere of their own
    rows = []
    for stream in streams:
        n_full = len(stream) // width
        cuts = [(i * width, (i + 1) * width) for i in range(n_full)]
        if len(stream) - n_full * width >= 2:
            cuts.append((n_full * width, len(stream)))
        for a, b in cuts:
            row_kinds = None
            if kinds is not None:
                row_kinds = kinds[a:b].copy()
                row_kinds[0] = START
            rows.append((stream[a:b], row_kinds))
    return rows


def masked_rows(pieces: list, width: int, pack: bool, too_long: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.concatenate([pieces[i][0][:width] for i in members]), np.concatenate([pieces[i][1][:width] for i in members]))
        for members in row_members(pieces, width, pack, too_long)
    ]


def row_members(pieces: list, width: int, pack: bool, too_long: str) -> list[list[int]]:
    """The samples (indexes into `pieces`, in order) each row holds; a sample longer than a row is cut to `width`
    (too_long: truncate) or left out (drop), and one with no target within the row is left out."""
    rows, members, used = [], [], 0
    for i, (ids, kinds) in enumerate(pieces):
        if len(ids) > width:
            if too_long == "drop":
                continue
            ids, kinds = ids[:width], kinds[:width]
        if not (kinds == TARGET).any():
            continue
        if not pack:
            rows.append([i])
            continue
        if used + len(ids) > width:
            rows.append(members)
            members, used = [], 0
        members.append(i)
        used += len(ids)
    if members:
        rows.append(members)
    return rows


def to_table(rows: list, width: int, pad_id: int, masked: bool) -> pa.Table:
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    for i, (row, _) in enumerate(rows):
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    columns = {"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), width), "length": pa.array(lengths)}
    if masked:
        kinds = np.full((len(rows), width), CONTEXT, dtype=np.uint8)
        for i, (_, row_kinds) in enumerate(rows):
            kinds[i, : len(row_kinds)] = row_kinds
        columns["n_targets"] = pa.array((kinds == TARGET).sum(axis=1).astype(np.int32))
        columns["kinds"] = pa.FixedSizeListArray.from_arrays(pa.array(kinds.reshape(-1)), width)
    else:
        columns["n_targets"] = pa.array(np.maximum(lengths - 1, 0).astype(np.int32))
    return pa.table(columns)
