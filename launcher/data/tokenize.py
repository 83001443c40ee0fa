"""`launcher tokenize CONFIG [--num-proc N] [--tokens-out DIR]`: a run's data preparation as a step of its own.

It builds what a run's start builds (the same config, the same cache keys: packing.py), with N processes and a
progress bar, and prints the throughput. A run started afterwards finds the rows prepared and reads nothing
else of the corpus (packing.cached_rows). Killed, it resumes when run again with the same N: the finished
shards of the tokenization are kept (packing.cache_file), the others made. `--tokens-out DIR` also writes the
tokenized documents as token shards (tokens.py; format text only), DIR/train/ and, with an evaluation set,
DIR/eval/, for `data.format: tokens`; shards written before a kill are kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from launcher.config import Config
from launcher.data import prepare_splits
from launcher.data.formats import Encoder
from launcher.data.packing import tokenize_samples
from launcher.data.sources import cache_root, data_identity, load_documents, split_documents
from launcher.data.tokens import dtype_for, write_shard
from launcher.errors import UsageError

SHARD_TOKENS = 1 << 28  # tokens per shard written by --tokens-out (512 MiB as uint16)


def tokenize(cfg: Config, tokenizer, num_proc: int | None, tokens_out: Path | None = None, shard_tokens: int = SHARD_TOKENS) -> str:
    """Prepare the data of `cfg` as a run would (data.num_proc replaced by `num_proc`); the summary line."""
    if cfg.data.format == "tokens":
        raise UsageError("launcher tokenize: data.format tokens is tokenized already; a run reads it as it is")
    if tokens_out is not None and cfg.data.format != "text":
        raise UsageError(f"--tokens-out: token shards hold format text's documents (data.format is {cfg.data.format}); drop --tokens-out")
    data = cfg.data.model_copy(update={"num_proc": num_proc}) if num_proc else cfg.data
    source_bytes = sum(i["bytes"] for i in data_identity(data).values())
    started_s = time.perf_counter()
    train, evaluation = prepare_splits(data, cfg.seed, tokenizer, report=print, progress=True)
    tokens = int(train.select_columns(["length"]).with_format("numpy")[:]["length"].sum())
    if evaluation is not None:
        tokens += int(evaluation.select_columns(["length"]).with_format("numpy")[:]["length"].sum())
    if tokens_out is not None:
        write_token_shards(data, cfg.seed, tokenizer, tokens_out, shard_tokens)
    elapsed_s = time.perf_counter() - started_s
    rate = f"{source_bytes / 1e6 / elapsed_s:.1f} MB/s, " if source_bytes else ""
    return (
        f"tokenized: {len(train):,} training rows{f' and {len(evaluation):,} evaluation rows' if evaluation is not None else ''},"
        f" {tokens:,} tokens in {elapsed_s:.1f}s ({rate}{tokens / elapsed_s:,.0f} tokens/s, {data.num_proc or 'default'} processes);"
        f" cache: {cache_root(data)}{f'; token shards: {tokens_out}' if tokens_out is not None else ''}"
    )


def write_token_shards(data, seed: int, tokenizer, out: Path, shard_tokens: int) -> None:
    """The documents' token ids (stage 1 of the run's preparation, read from its cache) as token shards of about
    `shard_tokens` tokens, cut at document boundaries; a shard already there (its .idx written last) is kept."""
    docs = load_documents(data)
    if data.eval_path is not None:
        splits = {"train": docs, "eval": load_documents(data, evaluation=True)}
    else:
        train_docs, eval_docs = split_documents(docs, data.eval_fraction, seed)
        splits = {"train": train_docs, "eval": eval_docs}
    dtype = dtype_for(tokenizer.vocab_size)
    for name, split in splits.items():
        if split is None:
            continue
        samples = tokenize_samples(split, Encoder(data, tokenizer, None), data.num_proc, cache_root(data) if split.cache_files else None)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        shard, pending, pending_tokens = 0, [], 0
        for table in samples.with_format("arrow").iter(batch_size=1000):
            ids = table.column("ids").combine_chunks()
            offsets, values = ids.offsets.to_numpy(), ids.flatten().to_numpy(zero_copy_only=False)
            for a, b in zip(offsets[:-1], offsets[1:]):
                pending.append(values[a:b].astype(dtype))  # a copy: the batch read is freed
                pending_tokens += int(b - a)
                if pending_tokens >= shard_tokens:
                    write_if_missing(folder / f"{name}_{shard:05d}.bin", pending, dtype)
                    shard, pending, pending_tokens = shard + 1, [], 0
        if pending or shard == 0:
            write_if_missing(folder / f"{name}_{shard:05d}.bin", pending, dtype)


def write_if_missing(path: Path, docs: list[np.ndarray], dtype) -> None:
    if not path.with_suffix(".idx").is_file():
        write_shard(path, docs, dtype)
