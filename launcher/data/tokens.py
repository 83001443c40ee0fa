"""Format `tokens`: corpora tokenized already, as memory-mapped token shards (what `launcher tokenize --tokens-out` writes).

The layout, one shard = two files side by side (nanoGPT's `.bin` plus a document index):
- `NAME.bin`: the token ids of every document one after the other, little-endian uint16 or uint32, no header
  (`numpy.memmap(path, dtype)` reads it as it is).
- `NAME.idx`: a 40-byte header, then `n_docs + 1` little-endian uint64 offsets: document `i` is tokens
  `offsets[i]:offsets[i + 1]` of the `.bin` (offsets[0] = 0, offsets[n_docs] = n_tokens). The header:
  the 8 bytes `LTOKIDX1`, uint32 bytes per token (2 or 4), uint32 0, uint64 n_tokens, uint64 n_docs,
  uint64 the largest token id in the shard.
data.path is one `.bin`, a folder (its `.bin` files, sorted by path) or a glob of `.bin` files; the shards'
documents are read in that order as one corpus.

Rows are those format `text` makes with `pack: true` from the same documents (packing.py): groups of
GROUP documents concatenated and cut into rows of `seq_len + 1`, a group's last short row kept when it has
a target; with `data.separate_documents`, with the same kinds (START where the row and each document in it
begin), found from the offsets inside the row. So a corpus given as text and as tokens trains on identical
batches. A row is located from its index in O(log groups): the start reads one offset per group (every
GROUP-th), never the tokens, and keeps those in a table under the data cache, so a later start reads 8 bytes
per group instead of paging in most of each index; a rank holds only memory maps and per-group arrays (24 bytes
per GROUP documents).

Checked at start, cheaply: each header, the file sizes it implies (a truncated `.bin`, one of the other
dtype, an index of another shard), the first and last offsets, and the largest token id against the
vocabulary; the ids of each row read are checked again against the vocabulary.
"""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from launcher.data.formats import CONTEXT, START, TARGET
from launcher.errors import UsageError

MAGIC = b"LTOKIDX1"
HEADER = struct.Struct("<8sIIQQQ")  # magic, bytes per token, reserved, n_tokens, n_docs, max token id
DTYPES = {2: np.uint16, 4: np.uint32}
GROUP = 1000  # documents per packing group: packing.GROUP (kept equal, so rows match format text's)


def dtype_for(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(bin_path: Path, docs: list[np.ndarray], dtype: type) -> None:
    """Write one shard (`NAME.bin` and `NAME.idx`), each under a temporary name renamed once complete: a shard
    whose `.idx` exists is whole (the `.idx` is renamed last)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.uint64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype=dtype)
    max_id = int(tokens.max()) if len(tokens) else 0
    header = HEADER.pack(MAGIC, np.dtype(dtype).itemsize, 0, int(offsets[-1]), len(docs), max_id)
    idx_path = bin_path.with_suffix(".idx")
    for path, payload in ((bin_path, [tokens.tobytes()]), (idx_path, [header, offsets.astype("<u8").tobytes()])):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with tmp.open("wb") as f:
            for chunk in payload:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)


def shard_files(path: Path, key: str = "data.path") -> list[Path]:
    """The `.bin` files of a tokens source: the file, a folder's (recursively) or a glob's, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.bin") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file() and p.endswith(".bin"))
    if not files:
        raise UsageError(f"{key}: '{path}' holds no .bin token file; point it at a .bin file, a folder or a glob of them (data.format: tokens)")
    not_bin = [p for p in files if p.suffix != ".bin"]
    if not_bin:
        raise UsageError(f"{key}: '{not_bin[0]}' is not a .bin token file; data.format tokens reads NAME.bin with NAME.idx beside it")
    return files


class Shard:
    """One `.bin` memory-mapped, with its document offsets memory-mapped from the `.idx`; checked on opening."""

    def __init__(self, bin_path: Path, key: str, vocab_size: int):
        self.path, idx_path = bin_path, bin_path.with_suffix(".idx")
        if not idx_path.is_file():
            raise UsageError(f"{key}: '{bin_path}' has no index '{idx_path.name}' beside it; write the shard with its .idx (launcher tokenize)")
        with idx_path.open("rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise UsageError(f"{key}: '{idx_path}' is not a token index (no {MAGIC.decode()} header); write it again with launcher tokenize")
        _, itemsize, _, self.n_tokens, self.n_docs, max_id = HEADER.unpack(raw)
        if itemsize not in DTYPES:
            raise UsageError(f"{key}: '{idx_path}' names {itemsize} bytes per token; only 2 (uint16) and 4 (uint32) are read")
        idx_bytes = HEADER.size + 8 * (self.n_docs + 1)
        if idx_path.stat().st_size != idx_bytes:
            raise UsageError(
                f"{key}: '{idx_path}' has {idx_path.stat().st_size} bytes, its header ({self.n_docs} documents) needs {idx_bytes};"
                " it is truncated or not this shard's index: write the shard again"
            )
        bin_bytes, want = bin_path.stat().st_size, self.n_tokens * itemsize
        if bin_bytes != want:
            other = {2: 4, 4: 2}[itemsize]
            why = (
                f"holds {np.dtype(DTYPES[other]).name} tokens, its index says {np.dtype(DTYPES[itemsize]).name}"
                if bin_bytes == self.n_tokens * other
                else "is truncated or not the shard of this index"
            )
            raise UsageError(
                f"{key}: '{bin_path}' has {bin_bytes} bytes, its index says {self.n_tokens} tokens of {itemsize} bytes ({want}): it {why}; write the shard again"
            )
        self.offsets = np.memmap(idx_path, dtype="<u8", mode="r", offset=HEADER.size, shape=(self.n_docs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != self.n_tokens:
            raise UsageError(
                f"{key}: '{idx_path}' offsets run from {self.offsets[0]} to {self.offsets[-1]}, not 0 to the {self.n_tokens} tokens of"
                f" '{bin_path.name}'; the index does not match its shard: write the shard again"
            )
        if max_id >= vocab_size:
            raise UsageError(
                f"{key}: '{bin_path}' holds token id {max_id}, beyond the vocabulary of {vocab_size} ids; tokenize with the run's tokenizer"
            )
        self.tokens = np.memmap(bin_path, dtype=DTYPES[itemsize], mode="r", shape=(self.n_tokens,)) if self.n_tokens else np.zeros(0, np.uint16)


class TokenRows:
    """Rows of `width` token ids from token shards, documents [doc_lo, doc_hi) of all shards in order, laid out as
    format text packs them. The same interface as store.RowStore: len, width, pad_id, target_counts, rows(idx).
    `separate` (data.separate_documents): rows come with kinds, START where the row and each document begin."""

    def __init__(
        self,
        shards: list[Shard],
        width: int,
        pad_id: int,
        vocab_size: int,
        doc_range: tuple[int, int] | None = None,
        separate: bool = False,
        cache_dir: Path | None = None,
    ):
        self.shards, self.width, self.pad_id, self.vocab_size, self.separate = shards, width, pad_id, vocab_size, separate
        self.doc_base = np.cumsum([0] + [s.n_docs for s in shards])  # first global document of each shard
        self.token_base = np.cumsum([0] + [s.n_tokens for s in shards])  # first global token of each shard
        lo, hi = doc_range or (0, int(self.doc_base[-1]))
        self.doc_range = (lo, hi)
        # each group's first token (one offset per group) and its rows: full rows, and a short last one with a target
        starts = self.group_starts(cache_dir)
        self.group_start = starts[:-1]
        self.group_tokens = np.diff(starts)
        rows = self.group_tokens // width + (self.group_tokens % width >= 2)
        self.group_first_row = np.concatenate([[0], np.cumsum(rows)])
        self.target_counts = RowTargets(self)

    def group_starts(self, cache_dir: Path | None) -> np.ndarray:
        """The first token of each group of GROUP documents, and the end: read from every GROUP-th offset, which pages
        in most of each index (1.6 to 2.7 s measured for 300 M documents, 600 GB of tokens, from the disk), or from the table an earlier
        start wrote under `cache_dir/token-groups/` (8 bytes a group), keyed by each shard's name, size, modification
        time and counts."""
        lo, hi = self.doc_range
        table = None
        if cache_dir is not None:
            key = xxhash.xxh3_128()
            for s in self.shards:
                stat = s.path.stat()
                key.update(f"{s.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{s.n_docs}\0{s.n_tokens}\n".encode())
            key.update(f"{lo} {hi} {GROUP}".encode())
            table = cache_dir / "token-groups" / f"{key.hexdigest()}.npy"
            n_bounds = len(range(lo, hi, GROUP)) + 1
            try:
                starts = np.load(table)
                if starts.shape == (n_bounds,) and starts.dtype == np.int64:
                    return starts
            except (OSError, ValueError):
                pass
        starts = self.doc_token(np.append(np.arange(lo, hi, GROUP), hi))
        if table is not None:
            try:
                table.parent.mkdir(parents=True, exist_ok=True)
                tmp = table.with_suffix(f".tmp{os.getpid()}.npy")
                np.save(tmp, starts)
                tmp.replace(table)  # atomic: ranks writing the same table at once each rename a whole one
            except OSError:
                pass  # a read-only cache: every start reads the offsets
        return starts

    def doc_token(self, docs: np.ndarray) -> np.ndarray:
        """The global token offset where each of the global documents `docs` starts (`n_docs`: the end)."""
        out = np.empty(len(docs), dtype=np.int64)
        shard = np.clip(np.searchsorted(self.doc_base, docs, side="right") - 1, 0, len(self.shards) - 1)
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = self.token_base[s] + self.shards[s].offsets[docs[mine] - self.doc_base[s]].astype(np.int64)
        return out

    def __len__(self) -> int:
        return int(self.group_first_row[-1])

    def doc_starts_in(self, start: int, end: int) -> np.ndarray:
        """The global token offsets where documents start within [start, end) (one per position: an empty document
        starts where the next one does)."""
        parts = []
        shard = int(np.searchsorted(self.token_base, start, side="right") - 1)
        while shard < len(self.shards) and self.token_base[shard] < end:
            base, offsets = int(self.token_base[shard]), self.shards[shard].offsets[:-1]
            lo, hi = np.searchsorted(offsets, np.array([max(start - base, 0), end - base], dtype=np.uint64), side="left")
            parts.append(offsets[lo:hi].astype(np.int64) + base)
            shard += 1
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def row_kinds(self, start: int, n: int) -> np.ndarray:
        """A row's kinds (separate documents): START at its first id and where each document in it begins."""
        kinds = np.full(self.width, CONTEXT, dtype=np.uint8)
        kinds[:n] = TARGET
        kinds[self.doc_starts_in(start, start + n) - start] = START
        kinds[0] = START
        return kinds

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's first global token and its length."""
        idx = np.asarray(idx, dtype=np.int64)
        group = np.searchsorted(self.group_first_row, idx, side="right") - 1
        within = (idx - self.group_first_row[group]) * self.width
        return self.group_start[group] + within, np.minimum(self.width, self.group_tokens[group] - within)

    def tokens(self, start: int, n: int) -> np.ndarray:
        """Global tokens [start, start + n): a row may run across shards."""
        parts, end = [], start + n
        shard = int(np.searchsorted(self.token_base, start, side="right") - 1)
        while start < end:
            base, s = self.token_base[shard], self.shards[shard]
            take = min(end, base + s.n_tokens) - start
            if take > 0:
                parts.append(s.tokens[start - base : start - base + take])
                start += take
            shard += 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def rows(self, idx: np.ndarray) -> dict:
        starts, lengths = self.locate(idx)
        ids = np.full((len(starts), self.width), self.pad_id, dtype=np.int32)
        for i, (start, n) in enumerate(zip(starts, lengths)):
            row = self.tokens(int(start), int(n))
            if len(row) and int(row.max()) >= self.vocab_size:  # the header's maximum may lie; a row costs one max
                shard = self.shards[int(np.searchsorted(self.token_base, start, side="right") - 1)]
                raise UsageError(
                    f"data.path: '{shard.path}' holds token id {int(row.max())}, beyond the vocabulary of {self.vocab_size} ids;"
                    " tokenize with the run's tokenizer"
                )
            ids[i, :n] = row
        out = {"input_ids": ids, "length": lengths}
        if self.separate:
            out["kinds"] = np.stack([self.row_kinds(int(a), int(n)) for a, n in zip(starts, lengths)]) if len(starts) else ids.astype(np.uint8)
        return out


class RowTargets:
    """Target tokens per row (its length - 1), computed for the rows asked for: no array over the whole corpus."""

    def __init__(self, rows: TokenRows):
        self.rows = rows

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(len(self.rows))[idx]
        starts, lengths = self.rows.locate(idx)
        if not self.rows.separate:
            return np.maximum(lengths - 1, 0)
        return np.array([int((self.rows.row_kinds(int(a), int(n))[1:] == TARGET).sum()) for a, n in zip(starts, lengths)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def sum(self) -> int:
        """All rows' targets: every token of a group in a row, less one per row; separate documents: less one per
        position inside a row where a document starts, read from every offset (launcher plan; a run never sums)."""
        r = self.rows
        in_rows = r.group_tokens - (r.group_tokens % r.width == 1)
        total = int(in_rows.sum() - len(r))
        if not r.separate:
            return total
        lo, hi = r.doc_range
        for first in range(lo, hi, 1 << 20):  # groups of documents at a time, 8 bytes each
            docs = np.arange(first, min(hi, first + (1 << 20)))
            group = (docs - lo) // GROUP
            at = r.doc_token(docs) - r.group_start[group]  # within its group's stream
            distinct = np.ones(len(at), dtype=bool)
            distinct[1:] = (at[1:] != at[:-1]) | (group[1:] != group[:-1])
            total -= int((distinct & (at > 0) & (at % r.width != 0) & (at < in_rows[group])).sum())
        return total


def open_tokens(path: Path, key: str, width: int, pad_id: int, vocab_size: int, separate: bool = False, cache_dir: Path | None = None) -> TokenRows:
    shards = [Shard(p, key, vocab_size) for p in shard_files(path, key)]
    return TokenRows(shards, width, pad_id, vocab_size, separate=separate, cache_dir=cache_dir)


def token_splits(cfg, pad_id: int, vocab_size: int, cache_dir: Path | None = None) -> tuple[TokenRows, TokenRows | None]:
    """Training and evaluation rows of format tokens: data.eval_path's shards, or the last data.eval_fraction of the
    documents (whole documents, the last ones: format text holds out documents drawn at random)."""
    width, separate = cfg.seq_len + 1, cfg.separate_documents
    if cfg.eval_path is not None or cfg.eval_fraction == 0:
        train = open_tokens(cfg.path, "data.path", width, pad_id, vocab_size, separate, cache_dir)
        held_out = open_tokens(cfg.eval_path, "data.eval_path", width, pad_id, vocab_size, separate, cache_dir) if cfg.eval_path else None
        return train, held_out
    shards = [Shard(p, "data.path", vocab_size) for p in shard_files(cfg.path, "data.path")]
    n_docs = sum(s.n_docs for s in shards)
    n_eval = max(1, round(cfg.eval_fraction * n_docs))
    if n_docs - n_eval < 1:
        raise UsageError(f"data.eval_fraction: {n_docs} document(s) cannot be split into train and eval; add documents or set data.eval_fraction=0")
    return (
        TokenRows(shards, width, pad_id, vocab_size, (0, n_docs - n_eval), separate, cache_dir),
        TokenRows(shards, width, pad_id, vocab_size, (n_docs - n_eval, n_docs), separate, cache_dir),
    )
