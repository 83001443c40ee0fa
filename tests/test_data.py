"""Data: local formats through HF datasets, the built-in corpus, packing, labels of padded rows."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import DataConfig
from launcher.data import IGNORE_INDEX, ByteTokenizer, load_documents, prepare_splits, rows_to_batch, tokenize_into_blocks

TEXTS = ["alpha beta", "gamma, delta and epsilon", "zeta"]


def write_format(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(TEXTS) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    else:
        import pandas as pd

        frame = pd.DataFrame({"body": TEXTS, "id": range(len(TEXTS))})
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_local_formats_load_as_documents(tmp_path: Path, suffix: str):
    cfg = DataConfig(path=write_format(tmp_path, suffix), text_field="body", cache_dir=tmp_path / "cache")
    docs = load_documents(cfg)
    assert docs.column_names == ["text"]
    assert [t.strip() for t in docs["text"]] == TEXTS


def test_builtin_corpus_is_python_documentation(tmp_path: Path):
    docs = load_documents(DataConfig(cache_dir=tmp_path))
    assert len(docs) > 50
    text = "\n".join(docs["text"])
    assert len(text) > 300_000 and 'The "assert" statement' in text


def test_packing_keeps_every_token_in_order():
    import datasets

    docs = datasets.Dataset.from_dict({"text": TEXTS * 5})
    blocks = tokenize_into_blocks(docs, seq_len=7, pack=True)
    ids, lengths = blocks[:]["input_ids"], blocks[:]["length"]
    stream = np.concatenate([row[:n] for row, n in zip(ids, lengths)])
    tok = ByteTokenizer()
    expected = [t for text in TEXTS * 5 for t in tok.encode(text) + [tok.eos_id]]
    assert stream.tolist() == expected
    assert (lengths[:-1] == 8).all()  # full blocks of seq_len + 1 but the tail


def test_unpacked_rows_never_cross_documents():
    import datasets

    blocks = tokenize_into_blocks(datasets.Dataset.from_dict({"text": TEXTS}), seq_len=7, pack=False)
    tok = ByteTokenizer()
    rows = [row[:n].tolist() for row, n in zip(blocks[:]["input_ids"], blocks[:]["length"])]
    for text in TEXTS:
        tokens = tok.encode(text) + [tok.eos_id]
        chunks = [tokens[i : i + 8] for i in range(0, len(tokens), 8)]
        assert all(c in rows for c in chunks if len(c) >= 2)


def test_labels_are_next_tokens_and_padding_has_no_target():
    rows = {"input_ids": np.array([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]]), "length": np.array([4, 6])}
    batch = rows_to_batch(rows, n_rows=3, width=6, pin=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[6, 7, 8, x, x], [2, 3, 4, 5, 6], [x, x, x, x, x]]
    assert batch.input_ids.dtype == torch.int64


def test_held_out_documents_are_not_trained_on(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(20)))
    train_blocks, eval_blocks = prepare_splits(DataConfig(path=path, eval_fraction=0.2, pack=False, seq_len=200), seed=0)
    decode = ByteTokenizer().decode
    train_texts = {decode(r[:n]) for r, n in zip(train_blocks[:]["input_ids"], train_blocks[:]["length"])}
    eval_texts = {decode(r[:n]) for r, n in zip(eval_blocks[:]["input_ids"], eval_blocks[:]["length"])}
    assert len(eval_texts) == 4 and len(train_texts) == 16 and not train_texts & eval_texts


def test_a_cache_hit_draws_no_held_out_split(tmp_path: Path, monkeypatch):
    """The held-out split is drawn (a permutation of every document) only when its documents are read: a start whose
    rows are cached takes the split's fingerprint and the source's cache files, and gives the same rows."""
    from launcher.data import sources

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(50)))
    cfg = DataConfig(path=path, eval_fraction=0.2, pack=True, seq_len=16, cache_dir=tmp_path / "cache")
    first = prepare_splits(cfg, seed=3)
    drawn = []
    monkeypatch.setattr(sources.DocumentSplit, "documents", property(lambda self: drawn.append(self) or pytest.fail("the split was drawn")))
    again = prepare_splits(cfg, seed=3)
    assert drawn == []
    for a, b in zip(first, again):
        assert a.cache_files == b.cache_files and np.array_equal(np.asarray(a["input_ids"]), np.asarray(b["input_ids"]))
    monkeypatch.undo()
    train, held_out = sources.split_documents(sources.load_documents(cfg), 0.2, seed=3)
    assert len(train) == 40 and len(held_out) == 10 and not set(train["text"]) & set(held_out["text"])
    want = sources.load_documents(cfg).train_test_split(test_size=10, seed=3, shuffle=True)
    assert sorted(held_out["text"]) == sorted(want["test"]["text"]) and sorted(train["text"]) == sorted(want["train"]["text"])


def test_row_store_reads_the_same_rows_as_datasets():
    import datasets

    from launcher.data import RowStore

    blocks = tokenize_into_blocks(datasets.Dataset.from_dict({"text": TEXTS * 700}), seq_len=7, pack=True)
    store = RowStore(blocks)
    assert len(store) == len(blocks) > 1000  # several Arrow chunks
    idx = np.random.default_rng(0).permutation(len(blocks))[:50]
    rows = store.rows(idx)
    assert np.array_equal(rows["input_ids"], blocks[idx]["input_ids"])
    assert np.array_equal(rows["length"], blocks[idx]["length"])
    shuffled = blocks.shuffle(seed=1)  # a view with an indices mapping
    assert np.array_equal(RowStore(shuffled).rows(idx)["input_ids"], shuffled[idx]["input_ids"])
