"""data.format tokens (memory-mapped token shards) and `launcher tokenize`: the shards of a corpus train exactly as
its text does, a killed tokenize resumes to the same result, and bad shards are one line, exit 2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.batches import BatchLayout
from launcher.config import load_config
from launcher.data import IGNORE_INDEX, TrainData, prepare_splits, rows_to_batch, target_counts
from launcher.data.formats import START, TARGET
from launcher.data.packing import text_rows
from launcher.data.tokens import HEADER, MAGIC, Shard, TokenRows, write_shard
from launcher.errors import UsageError
from launcher.tokenizer import ByteTokenizer
from tests.conftest import PYTHON, REPO, check, cpu_env, final_weights, metrics, run_cli, tiny_config, write_config, write_documents

N_DOCS = 2500  # more than a packing group (1,000 documents): rows cut at group ends, groups across shards
SHARD_TOKENS = 40_000  # 4 shards of the corpus's 158,842 tokens


def tokenize_cmd(config: Path, out: Path, *overrides: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "launcher",
        "tokenize",
        str(config),
        *overrides,
        "--num-proc",
        "2",
        "--tokens-out",
        str(out),
        "--shard-tokens",
        str(SHARD_TOKENS),
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A text corpus tokenized by `launcher tokenize` into the cache and into token shards, and a config for each."""
    root = tmp_path_factory.mktemp("tokens")
    docs = write_documents(root / "corpus.jsonl", N_DOCS)
    data = {"path": str(docs), "pack": True, "eval_fraction": 0, "cache_dir": str(root / "cache")}
    text = write_config(
        root / "text.yaml",
        tiny_config(root, data=data, train={"max_steps": 4, "micro_batch_size": 4}, checkpoint={"every_steps": 2}),
    )
    done = check(subprocess.run(tokenize_cmd(text, root / "shards"), cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300))
    assert "tokenized: 4,815 training rows, 158,842 tokens" in done.stdout, done.stdout
    tokens = write_config(
        root / "tokens.yaml",
        tiny_config(
            root,
            data={**data, "format": "tokens", "path": str(root / "shards" / "train")},
            train={"max_steps": 4, "micro_batch_size": 4},
            checkpoint={"every_steps": 2},
        ),
    )
    return {"root": root, "text": text, "tokens": tokens, "shards": root / "shards" / "train"}


def documents_starting_inside_a_row(shards: Path, width: int) -> int:
    """By a plain walk over the documents' lengths: those starting past a row's first id (groups of 1,000 documents,
    each cut into rows of `width`; a group's last id alone is in no row)."""
    lengths = []
    for idx in sorted(shards.glob("*.idx")):
        offsets = np.fromfile(idx, dtype="<u8", offset=HEADER.size).astype(np.int64)
        lengths += np.diff(offsets).tolist()
    inside = 0
    for first in range(0, len(lengths), 1000):
        group = lengths[first : first + 1000]
        covered = sum(group) - (sum(group) % width == 1)
        at = 0
        for n in group:
            inside += 0 < at < covered and at % width != 0 and n > 0
            at += n
    return inside


@pytest.mark.parametrize("separate", [False, True], ids=["continue", "separate_documents"])
def test_token_shards_give_the_rows_and_batches_of_the_text(corpus, separate: bool):
    """Every window of two epochs, 2 ranks x 2 micro-steps: the same ids, labels, positions and target counts as the
    text; separate documents take one target from a row for each document starting inside it."""
    shards = sorted(p.name for p in corpus["shards"].iterdir())
    assert shards == [f"train_{i:05d}.{suffix}" for i in range(4) for suffix in ("bin", "idx")]
    text_cfg, tokens_cfg = (load_config(str(corpus[name]), [f"data.separate_documents={separate}"]).data for name in ("text", "tokens"))
    text_rows, _ = prepare_splits(text_cfg, 1)
    token_rows, _ = prepare_splits(tokens_cfg, 1)
    assert len(token_rows) == len(text_rows) == 4815
    every = 158_842 - 4815  # a target per token in a row but its first
    inside = documents_starting_inside_a_row(corpus["shards"], text_cfg.seq_len + 1) if separate else 0
    assert not separate or 2000 < inside < 2500 - 3  # every document but each group's first, less those starting a row
    assert target_counts(token_rows).sum() == int(target_counts(text_rows).sum()) == every - inside
    plan = BatchLayout(micro_batch_size=3, gradient_accumulation_steps=2, world_size=2)
    restarts = 0
    for rank in (0, 1):
        text, tokens = TrainData(text_rows, plan, rank, 1, True, False), TrainData(token_rows, plan, rank, 1, True, False)
        for step in range(2 * text.steps_per_epoch):
            a, b = text.window(step), tokens.window(step)
            assert a.global_target_tokens == b.global_target_tokens, step
            for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
                assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels), step
                if x.position_ids is None or not separate:  # separate: no row of this micro-batch has a document start inside
                    assert x.position_ids is None and y.position_ids is None
                    continue
                assert torch.equal(x.position_ids, y.position_ids), step
                # a document's first input has position 0 and its last input (its EOS) predicts nothing
                restart = x.position_ids[:, 1:] == 0
                assert torch.all(x.labels[:, :-1][restart] == IGNORE_INDEX)
                restarts += int(restart.sum())
    assert (restarts > 0) == separate


def test_separate_documents_restart_positions_at_each_document_within_a_row(tmp_path: Path):
    """Documents of 3, 1, 0, 5 and 2 tokens in two shards, rows of 5 ids: by hand, the text layout and the shards give
    START (no target, position 0) where the row and each document begin, once per position (an empty document starts
    where the next does); the 11th id, a row of one, is left out."""
    docs = [np.array([10, 11, 12]), np.array([20]), np.array([], dtype=np.int64), np.array([30, 31, 32, 33, 34]), np.array([40, 41])]
    write_shard(tmp_path / "a.bin", [d.astype(np.uint16) for d in docs[:3]], np.uint16)
    write_shard(tmp_path / "b.bin", [d.astype(np.uint16) for d in docs[3:]], np.uint16)
    rows = TokenRows([Shard(tmp_path / name, "data.path", 257) for name in ("a.bin", "b.bin")], 5, 0, 257, separate=True)
    S, T = START, TARGET
    want_ids, want_kinds = [[10, 11, 12, 20, 30], [31, 32, 33, 34, 40]], [[S, T, T, S, S], [S, T, T, T, S]]
    got = rows.rows(np.arange(len(rows)))
    assert got["input_ids"].tolist() == want_ids and got["kinds"].tolist() == want_kinds
    assert rows.target_counts[:].tolist() == [2, 3] and rows.target_counts.sum() == 5
    text = text_rows([(d, None) for d in docs], 5, True, separate=True)
    assert [r.tolist() for r, _ in text] == want_ids and [k.tolist() for _, k in text] == want_kinds
    batch = rows_to_batch(got, 2, 5, False)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert batch.labels.tolist() == [[11, 12, IGNORE_INDEX, IGNORE_INDEX], [32, 33, 34, IGNORE_INDEX]]
    assert TokenRows(rows.shards, 5, 0, 257).target_counts.sum() == 8  # positions running on: every id but each row's first


def test_token_shards_train_as_the_text_on_1_and_2_ranks_and_resume_bitwise(corpus):
    """Positions running on (the default) on 1 and 2 ranks, and data.separate_documents on 2; a resume of the shards."""
    root = corpus["root"]
    runs = {}
    for nproc in (1, 2):
        for name in ("text", "tokens"):
            runs[name, nproc] = root / f"{name}-{nproc}"
            check(run_cli("train", str(corpus[name]), f"output_dir={runs[name, nproc]}", nproc=nproc))
        text, tokens = final_weights(runs["text", nproc]), final_weights(runs["tokens", nproc])
        assert text.keys() == tokens.keys()
        for key, tensor in text.items():
            assert torch.equal(tokens[key], tensor), (nproc, key)
        assert [r["loss"] for r in metrics(runs["tokens", nproc]) if "loss" in r] == [r["loss"] for r in metrics(runs["text", nproc]) if "loss" in r]
    separate = {}  # data.separate_documents: the same on both, and not the weights of positions and attention running on
    for name in ("text", "tokens"):
        separate[name] = root / f"{name}-separate"
        check(run_cli("train", str(corpus[name]), f"output_dir={separate[name]}", "data.separate_documents=true", nproc=2))
    text, tokens, continued = (final_weights(p) for p in (separate["text"], separate["tokens"], runs["text", 2]))
    for key, tensor in text.items():
        assert torch.equal(tokens[key], tensor), key
    assert any(not torch.equal(continued[key], tensor) for key, tensor in text.items())
    resumed = root / "tokens-resumed"
    checkpoint = runs["tokens", 1] / "checkpoints" / "step-000000002"
    check(run_cli("train", str(corpus["tokens"]), f"output_dir={resumed}", f"resume={checkpoint}"))
    straight, again = final_weights(runs["tokens", 1]), final_weights(resumed)
    for key, tensor in straight.items():
        assert torch.equal(again[key], tensor), key


def test_a_later_start_reads_the_group_table_instead_of_the_offsets(corpus, tmp_path: Path, monkeypatch):
    """The first start writes each group's first token under the data cache; a later one reads it and no offset; a
    shard written again (another modification time) is read afresh."""
    shards = tmp_path / "shards"
    shutil.copytree(corpus["shards"], shards)
    cfg = load_config(str(corpus["tokens"]), [f"data.path={shards}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.1"])
    first, held_out = prepare_splits(cfg.data, 1)
    tables = sorted((tmp_path / "cache" / "token-groups").glob("*.npy"))
    assert len(tables) == 2  # the training and the held-out documents'
    read = []
    real = TokenRows.doc_token
    monkeypatch.setattr(TokenRows, "doc_token", lambda self, docs: read.append(len(docs)) or real(self, docs))
    again, held_out_again = prepare_splits(cfg.data, 1)
    assert read == []
    assert np.array_equal(again.group_start, first.group_start) and np.array_equal(held_out_again.group_first_row, held_out.group_first_row)
    os.utime(shards / "train_00001.bin", ns=(1, 1))
    prepare_splits(cfg.data, 1)
    assert read == [len(first.group_start) + 1, len(held_out.group_start) + 1]


def test_tokenize_killed_midway_and_run_again_equals_an_uninterrupted_one(corpus):
    root = corpus["root"]
    cache = root / "cache-killed"
    cmd = tokenize_cmd(corpus["text"], root / "shards-killed", f"data.cache_dir={cache}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((cache / "tokenized").glob("*_of_00002.arrow")):  # the first shard of the tokenization is written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    print(sorted(p.name for p in (cache / "tokenized").iterdir()))
    assert not (root / "shards-killed" / "train" / "train_00003.idx").exists()  # it did not finish
    finished = sorted((cache / "tokenized").glob("*_of_00002.arrow"))
    entry = cache / "tokenized" / (finished[0].name.split("_")[0] + ".arrow")
    within_tokenization = not entry.with_suffix(".manifest.json").exists()
    again = check(subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300))
    if within_tokenization:  # its finished shards are read, the others made
        assert f"data: resuming the tokenization of '{entry.name}': {len(finished)} of 2 shards were finished" in again.stdout
    assert "tokenized: 4,815 training rows, 158,842 tokens" in again.stdout
    for shard in sorted(corpus["shards"].iterdir()):
        assert (root / "shards-killed" / "train" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    cfg = load_config(str(corpus["text"]))
    straight, _ = prepare_splits(cfg.data, 1)
    killed, _ = prepare_splits(cfg.data.model_copy(update={"cache_dir": cache}), 1)
    assert np.array_equal(np.asarray(killed["input_ids"]), np.asarray(straight["input_ids"]))


def bad_shards(corpus, tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the corpus's shards made bad one way; the error line it must give."""
    shards = tmp_path / "shards"
    shutil.copytree(corpus["shards"], shards)
    first, second = shards / "train_00000.bin", shards / "train_00001.bin"
    n_tokens = first.stat().st_size // 2
    if case == "wrong dtype":
        first.write_bytes(np.fromfile(first, dtype=np.uint16).astype(np.uint32).tobytes())
        return shards, (
            f"data.path: '{first}' has {4 * n_tokens} bytes, its index says {n_tokens} tokens of 2 bytes ({2 * n_tokens}):"
            " it holds uint32 tokens, its index says uint16; write the shard again"
        )
    if case == "truncated":
        with first.open("r+b") as f:
            f.truncate(2 * n_tokens - 10)
        return shards, (
            f"data.path: '{first}' has {2 * n_tokens - 10} bytes, its index says {n_tokens} tokens of 2 bytes ({2 * n_tokens}):"
            " it is truncated or not the shard of this index; write the shard again"
        )
    if case == "another shard's index":
        shutil.copy(second.with_suffix(".idx"), first.with_suffix(".idx"))
        n_other = second.stat().st_size // 2
        return shards, (
            f"data.path: '{first}' has {2 * n_tokens} bytes, its index says {n_other} tokens of 2 bytes ({2 * n_other}):"
            " it is truncated or not the shard of this index; write the shard again"
        )
    if case == "offsets of another shard":  # the header's counts agree with the .bin, the offsets do not
        idx = first.with_suffix(".idx")
        raw = bytearray(idx.read_bytes())
        raw[-8:] = np.array([n_tokens + 5], dtype="<u8").tobytes()
        idx.write_bytes(bytes(raw))
        return shards, (
            f"data.path: '{idx}' offsets run from 0 to {n_tokens + 5}, not 0 to the {n_tokens} tokens of 'train_00000.bin';"
            " the index does not match its shard: write the shard again"
        )
    assert case == "beyond the vocabulary"
    write_shard(second, [np.array([1, 2, 300, 4])], np.uint16)
    return shards, f"data.path: '{second}' holds token id 300, beyond the vocabulary of 257 ids; tokenize with the run's tokenizer"


@pytest.mark.parametrize("case", ["wrong dtype", "truncated", "another shard's index", "offsets of another shard", "beyond the vocabulary"])
def test_bad_token_shards_are_one_line(corpus, tmp_path: Path, case: str):
    shards, line = bad_shards(corpus, tmp_path, case)
    cfg = load_config(str(corpus["tokens"]), [f"data.path={shards}"])
    with pytest.raises(UsageError) as err:
        prepare_splits(cfg.data, 1, ByteTokenizer())
    assert err.value.lines == [line]


def test_a_bad_token_shard_stops_the_run_with_exit_2_and_one_line(corpus, tmp_path: Path):
    shards, line = bad_shards(corpus, tmp_path, "truncated")
    proc = run_cli("train", str(corpus["tokens"]), f"data.path={shards}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"launcher: error: {line}"]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_token_id_beyond_the_vocabulary_that_the_header_hides_is_found_in_its_row(tmp_path: Path):
    """The header's maximum is checked at start; a row read is checked again (its max), so a lying header is caught."""
    path = tmp_path / "lie.bin"
    write_shard(path, [np.arange(10, dtype=np.uint16), np.array([5, 300, 7], dtype=np.uint16)], np.uint16)
    idx = path.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[: HEADER.size] = HEADER.pack(MAGIC, 2, 0, 13, 2, 9)
    idx.write_bytes(bytes(raw))
    cfg = load_config(
        str(
            write_config(
                tmp_path / "c.yaml",
                tiny_config(tmp_path, data={"format": "tokens", "path": str(path), "pack": True, "seq_len": 4, "eval_fraction": 0}),
            )
        )
    )
    rows, _ = prepare_splits(cfg.data, 1, ByteTokenizer())
    assert len(rows) == 3  # 13 tokens of one group: rows of 5, 5 and 3
    data = TrainData(rows, BatchLayout(3, 1, 1), 0, 1, False, False)
    with pytest.raises(UsageError) as err:
        data.window(0)
    assert err.value.lines == [f"data.path: '{path}' holds token id 300, beyond the vocabulary of 257 ids; tokenize with the run's tokenizer"]
