"""Data through HF `datasets`: sources (sources.py), formats and loss masks (formats.py), tokenizing and
rows (packing.py), and the per-rank batches the loop reads (store.py).

Every sample is a fixed-width row of `seq_len + 1` token ids; the model reads `ids[:-1]` and predicts
`ids[1:]`, and the loss counts only the target tokens of each row (`n_targets`, stored with the row),
so the loop normalizes exactly over the tokens that count whatever the format.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets

from launcher.config import DataConfig
from launcher.data.formats import DEFAULT_CHAT_TEMPLATE, Encoder, chat_template, trained_template, unknown_markers
from launcher.data.mixture import Mixture, make_mixture, mixture_splits
from launcher.data.packing import SampleCounts, cached_rows, count_samples, layout_rows, tokenize_samples
from launcher.data.sources import (
    builtin_corpus_file,
    cache_root,
    check_text_column,
    data_identity,
    first_bad_json_row,
    load_documents,
    saved_eval_split,
    split_documents,
)
from launcher.data.store import IGNORE_INDEX, Batch, EvalData, RowStore, TrainData, Window, rows_to_batch, sample_lengths, target_counts
from launcher.data.tokens import token_splits
from launcher.errors import UsageError
from launcher.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "Batch",
    "ByteTokenizer",
    "EvalData",
    "HFTokenizer",
    "Mixture",
    "RowStore",
    "TrainData",
    "Window",
    "builtin_corpus_file",
    "check_trained_tokens",
    "cache_root",
    "check_text_column",
    "data_identity",
    "first_bad_json_row",
    "load_documents",
    "make_mixture",
    "prepare_splits",
    "rows_to_batch",
    "sample_lengths",
    "split_documents",
    "split_sources",
    "target_counts",
    "tokenize_into_blocks",
    "trained_template",
]


def tokenize_into_blocks(
    docs: datasets.Dataset,
    seq_len: int,
    pack: bool,
    tokenizer: ByteTokenizer | HFTokenizer | None = None,
    cfg: DataConfig | None = None,
    what: str = "data",
    report: Callable[[str], None] | None = None,
) -> datasets.Dataset:
    """Rows of `seq_len + 1` token ids with their `length`, `n_targets` (and `kinds`, for masked formats)."""
    tokenizer = tokenizer or ByteTokenizer()
    cfg = cfg or DataConfig(seq_len=seq_len, pack=pack)
    template = chat_template(cfg, tokenizer) if cfg.format == "chat" else None
    cache_dir = cache_root(cfg) if docs.cache_files else None
    encoder = Encoder(cfg, tokenizer, template)
    separate = cfg.separate_documents
    if (rows := cached_rows(docs, encoder, seq_len, pack, cfg.too_long, tokenizer.pad_id, cache_dir, separate)) is not None:
        return rows  # prepared already (a run before, or `launcher tokenize`): the samples are not opened
    samples = tokenize_samples(docs, encoder, cfg.num_proc, cache_dir, report)
    if cfg.format != "text":
        counts = count_samples(samples, seq_len + 1, cfg.too_long)
        check_trained_tokens(counts, cfg, what)
        if counts.samples and counts.samples == counts.dropped_too_long + counts.dropped_no_target:
            raise UsageError(
                f"data.too_long: every one of the {counts.samples} {what} samples is dropped ({counts.dropped_too_long}"
                f" longer than seq_len + 1 = {seq_len + 1} tokens, {counts.dropped_no_target} with no target token"
                " within them); raise data.seq_len, or use data.too_long: truncate"
            )
        if report is not None and (line := counts.describe(what)):
            report(line)
    return layout_rows(samples, seq_len, pack, cfg.too_long, tokenizer.pad_id, cache_dir, report, separate)


def check_trained_tokens(counts: SampleCounts, cfg: DataConfig, what: str) -> None:
    """A dataset that would train on nothing, or on every token where only the assistant's should train, is a
    mapping or template mistake (e.g. data.roles mapping every role to assistant): refuse it before training."""
    if counts.samples and counts.no_target == counts.samples:
        fix = (
            "check data.roles (which role is the assistant's), data.train_field and data.train_on"
            if cfg.format == "chat"
            else "give the rows a non-empty completion"
        )
        raise UsageError(
            f"data.train_on: none of the {counts.samples} {what} samples has a trained token; {fix} (launcher preview CONFIG shows them)"
        )
    if cfg.format == "chat" and cfg.train_on == "assistant" and counts.samples and counts.all_targets == counts.samples:
        raise UsageError(
            f"data.train_on: assistant, but every token of all {counts.samples} {what} samples is trained (no prompt is context);"
            " check data.roles (the user's role must not map to assistant), data.train_field and the template"
            " (launcher preview CONFIG shows them)"
        )


def prepare_splits(
    cfg: DataConfig,
    seed: int,
    tokenizer: ByteTokenizer | HFTokenizer | None = None,
    report: Callable[[str], None] | None = None,
    progress: bool = False,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Tokenized training and evaluation rows (the documents of `split_sources`). `progress`: datasets' bars while
    tokenizing (`launcher tokenize`; a run's log has none)."""
    datasets.disable_progress_bars()
    tokenizer = tokenizer or ByteTokenizer()
    if cfg.sources is not None:  # each source on its own, then tagged and concatenated
        return mixture_splits(cfg, lambda one: prepare_splits(one, seed, tokenizer, report))
    if cfg.format == "tokens":
        return token_splits(cfg, tokenizer.pad_id, tokenizer.vocab_size, cache_root(cfg))
    train_docs, eval_docs = split_sources(cfg, seed, report)
    if progress:
        datasets.enable_progress_bars()
    if report is not None and (warning := unknown_markers(cfg, tokenizer)):
        report(warning)
    train_blocks = tokenize_into_blocks(train_docs, cfg.seq_len, cfg.pack, tokenizer, cfg, "training", report)
    if len(train_blocks) == 0:
        raise UsageError("data.path: the training split has no text; use a larger file or a smaller data.eval_fraction")
    eval_blocks = None
    if eval_docs is not None:
        eval_blocks = tokenize_into_blocks(eval_docs, cfg.seq_len, cfg.pack, tokenizer, cfg, "evaluation", report)
    return train_blocks, eval_blocks


def split_sources(cfg: DataConfig, seed: int, report: Callable[[str], None] | None = None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and evaluation documents: the evaluation set is data.eval_path / data.eval_split when given, else a
    DatasetDict folder's test/validation split, else the held-out fraction of the training documents (None when
    data.eval_fraction is 0)."""
    datasets.disable_progress_bars()
    docs = load_documents(cfg)
    if cfg.eval_path is not None or cfg.eval_split is not None:
        return docs, load_documents(cfg, evaluation=True)
    if (split := saved_eval_split(cfg)) is not None:
        if report is not None:
            report(f"data: evaluating on the '{split}' split of '{cfg.path}' (set data.eval_split, or data.eval_fraction to hold out training rows)")
        return docs, load_documents(cfg.model_copy(update={"eval_split": split}), evaluation=True)
    return split_documents(docs, cfg.eval_fraction, seed)
