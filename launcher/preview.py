"""`launcher preview CONFIG [--n N] [--split train|eval] [--ids]`: the first N samples of a split as the model sees
them, before any training: the text with the trained tokens marked (green on a terminal, [[...]] in a file or a
pipe), the token ids on request, which samples share a row (packing), what was cut or dropped, each sample's
number of trained tokens, and a summary of the whole split. The data is read, mapped, rendered and tokenized
exactly as `launcher train` does (and into the same cache); a split that training would refuse is shown, then
refused with the same line (exit 2).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.compute as pc

from launcher.config import Config
from launcher.data import Encoder, chat_template, check_trained_tokens, split_sources
from launcher.data.formats import TARGET
from launcher.data.packing import count_samples, row_members, tokenize_samples
from launcher.data.sources import cache_root
from launcher.errors import UsageError
from launcher.tokenizer import load_tokenizer

BRACKETS = ("[[", "]]")
GREEN = ("\x1b[1;32m", "\x1b[0m")


def preview(cfg: Config, n: int, split: str, show_ids: bool, out=sys.stdout, colour: bool = False) -> None:
    data = cfg.data
    tokenizer = load_tokenizer(cfg)
    train_docs, eval_docs = split_sources(data, cfg.seed, report=lambda line: print(line, file=sys.stderr))
    docs = train_docs if split == "train" else eval_docs
    if docs is None:
        raise UsageError(
            "--split eval: this config has no evaluation set (data.eval_fraction: 0); set data.eval_fraction, data.eval_path or data.eval_split"
        )
    what = "training" if split == "train" else "evaluation"
    template = chat_template(data, tokenizer) if data.format == "chat" else None
    samples = tokenize_samples(docs, Encoder(data, tokenizer, template), data.num_proc, cache_root(data) if docs.cache_files else None)
    width, marks = data.seq_len + 1, GREEN if colour else BRACKETS
    shown = samples.select(range(min(n, len(samples))))
    if data.format == "text":  # documents are concatenated and cut into rows: every token but a row's first trains
        print(f"format text: documents are joined and cut into rows of seq_len + 1 = {width} tokens; every token but a row's first trains", file=out)
        for number, ids in enumerate(shown["ids"], 1):
            print(f"── document {number}: {len(ids)} tokens", file=out)
            print(render(tokenizer, ids, np.full(len(ids), TARGET), marks, show_ids), file=out)
        tokens = pc.sum(pc.list_value_length(samples.data.column("ids"))).as_py() or 0
        print(f"summary: {len(samples)} {what} documents, {tokens} tokens", file=out)
        return
    pieces = [(np.asarray(ids), np.asarray(kinds)) for ids, kinds in zip(shown["ids"], shown["kinds"])]
    rows = row_members(pieces, width, data.pack, data.too_long)
    row_of = {i: r for r, members in enumerate(rows) for i in members}
    for i, (ids, kinds) in enumerate(pieces):
        if i in row_of and row_of[i] != row_of.get(i - 1):
            members = rows[row_of[i]]
            used = sum(min(len(pieces[k][0]), width) for k in members)
            span = f"sample {members[0] + 1}" + (f"-{members[-1] + 1}" if len(members) > 1 else "")
            print(f"══ row {row_of[i] + 1}: {span}, {used} of {width} tokens", file=out)
        kept = min(len(ids), width)
        trained = int((kinds[:kept] == TARGET).sum())
        if i not in row_of:
            reason = f"longer than seq_len + 1 = {width}" if len(ids) > width and data.too_long == "drop" else "no trained token"
            state = f"dropped ({reason})"
        else:
            state = f"truncated from {len(ids)} to {width} tokens" if len(ids) > width else ""
        head = f"── sample {i + 1}: {kept} tokens, {trained} trained" + (f", {state}" if state else "")
        print(head, file=out)
        print(render(tokenizer, ids[:kept], kinds, marks, show_ids), file=out)
    counts = count_samples(samples, width, data.too_long)
    share = 100 * counts.no_target / max(counts.samples, 1)
    print(
        f"summary: {counts.samples} {what} samples ({len(pieces)} shown); {counts.no_target} ({share:.1f}%) with no trained token,"
        f" {counts.truncated} truncated, {counts.dropped_too_long + counts.dropped_no_target} dropped;"
        f" {counts.targets} of {counts.tokens} tokens trained ({100 * counts.targets / max(counts.tokens, 1):.1f}%)",
        file=out,
    )
    check_trained_tokens(counts, data, what)


def render(tokenizer, ids, kinds, marks: tuple[str, str], show_ids: bool) -> str:
    """The tokens' text, each run of trained tokens between the marks (and, with show_ids, their ids likewise)."""
    runs, start = [], 0
    trained = kinds[: len(ids)] == TARGET
    for k in range(1, len(ids) + 1):
        if k == len(ids) or trained[k] != trained[start]:
            runs.append((ids[start:k], bool(trained[start])))
            start = k
    text = "".join(f"{marks[0]}{decode(tokenizer, run)}{marks[1]}" if on else decode(tokenizer, run) for run, on in runs)
    if not show_ids:
        return text
    numbers = " ".join(f"{marks[0]}{' '.join(map(str, run))}{marks[1]}" if on else " ".join(map(str, run)) for run, on in runs)
    return f"{text}\nids: {numbers}"


def decode(tokenizer, ids) -> str:
    """The text of some ids, special tokens written out (the byte-level tokenizer's EOS as its text)."""
    ids = [int(i) for i in ids]
    if getattr(tokenizer, "tokenizer", None) is not None:
        return tokenizer.decode(ids)
    pieces, current = [], []
    for i in ids:
        if i == tokenizer.eos_id:
            pieces += [tokenizer.decode(current), tokenizer.eos_token]
            current = []
        else:
            current.append(i)
    return "".join(pieces) + tokenizer.decode(current)
