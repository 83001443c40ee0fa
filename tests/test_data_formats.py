"""Formats and loss masks: which token positions count, on hand-built expectations (byte-level and BPE tokenizers,
three chat templates); packed samples that do not see each other; exact accumulation when only assistant tokens count."""

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.config import DataConfig, load_config
from launcher.data import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, RowStore, rows_to_batch, tokenize_into_blocks
from launcher.tokenizer import ByteTokenizer, HFTokenizer

from conftest import check, final_weights, metrics, run_cli, tiny_config, write_config

EOS = "<|endoftext|>"  # the byte-level tokenizer's EOS, as chat templates write it

CONVERSATIONS = [
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Café?"},
        {"role": "assistant", "content": "Oui, un café."},
    ],
]
PAIRS = [("Q: 2+2?", " A: 4"), ("Translate 'chat':", " cat, in French.")]


def rows_of(records: list[dict], tokenizer, **data) -> list[tuple[list[int], list[int]]]:
    """Each sample's ids and labels as the training loop gets them (one padded row per sample)."""
    cfg = DataConfig(seq_len=160, pack=False, **data)
    blocks = tokenize_into_blocks(datasets.Dataset.from_list(records), cfg.seq_len, False, tokenizer, cfg)
    store = RowStore(blocks)
    batch = rows_to_batch(store.rows(np.arange(len(store))), len(store), store.width, pin=False)
    assert batch.position_ids is None
    return [
        (row[:n].tolist(), ids[: n - 1].tolist())  # input_ids lack the last id: add it back from the store
        for row, ids, n in zip(store.rows(np.arange(len(store)))["input_ids"], batch.labels, store.lengths)
    ]


def hand_built(encode, pieces: list[tuple[str, bool | tuple[str, bool]]], decode=None) -> tuple[list[int], list[int]]:
    """ids of the pieces one after the other, and the labels: each id whose piece counts, predicted from the one before.
    A piece (text, (prefix, counted)) is tokenized as a whole (BPE would merge across the cut), and its ids that
    decode to `prefix` are context."""
    ids, counts = [], []
    for text, counted in pieces:
        piece = encode(text)
        if isinstance(counted, tuple):
            prefix, counted = counted
            k = next(k for k in range(len(piece) + 1) if decode(piece[:k]) == prefix)
            counts += [False] * k + [counted] * (len(piece) - k)
        else:
            counts += [counted] * len(piece)
        ids += piece
    return ids, [t if c else IGNORE_INDEX for t, c in zip(ids[1:], counts[1:])]


def byte_encode(text: str) -> list[int]:
    return [256] if text == EOS else list(text.encode())


def hf_encode(tokenizer):
    return lambda text: tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_pieces(style: str, messages: list[dict], bos: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation cut where context and assistant turns meet; True: the piece counts in the loss."""
    pieces = [(bos, False)] if bos else []
    for m in messages:
        is_assistant = m["role"] == "assistant"
        if style == "default":  # <|role|>\ncontent, then EOS (assistant) or \n
            pieces += [(f"<|{m['role']}|>\n", False), (m["content"], is_assistant), (EOS if is_assistant else "\n", is_assistant)]
        elif style == "chatml":  # <|im_start|>role\ncontent<|im_end|>\n
            pieces += [
                ("<|im_start|>", False),
                (f"{m['role']}\n", False),
                (m["content"], is_assistant),
                ("<|im_end|>", is_assistant),
                ("\n", is_assistant),
            ]
        else:  # llama3: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
            pieces += [
                ("<|start_header_id|>", False),
                (m["role"], False),
                ("<|end_header_id|>", False),
                ("\n\n" + m["content"], ("\n\n", is_assistant)),
                ("<|eot_id|>", is_assistant),
            ]
    return [(text, counted) for text, counted in pieces if text]


def test_chat_labels_count_assistant_turns_only(chat_tokenizers):
    """Byte-level tokenizer with the default template; ChatML and Llama-3 templates on the BPE tokenizers."""
    from transformers import AutoTokenizer

    cases = {"default": (ByteTokenizer(), byte_encode, "")}
    for style, folder in chat_tokenizers.items():
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder), str(folder))
        cases[style] = (tokenizer, hf_encode(tokenizer), tokenizer.bos_token if style == "llama3" else "")
    for style, (tokenizer, encode, bos) in cases.items():
        got = rows_of([{"messages": m} for m in CONVERSATIONS], tokenizer, format="chat")
        for messages, (ids, labels) in zip(CONVERSATIONS, got):
            expected_ids, expected_labels = hand_built(encode, chat_pieces(style, messages, bos), tokenizer.decode)
            assert ids == expected_ids, style
            assert labels == expected_labels, (style, [tokenizer.decode([t]) for t in labels if t != IGNORE_INDEX])
        everything = rows_of([{"messages": m} for m in CONVERSATIONS], tokenizer, format="chat", train_on="all")
        assert [labels for _, labels in everything] == [ids[1:] for ids, _ in got], style
    # the default template names EOS through the tokenizer: with a BPE tokenizer it is that tokenizer's EOS
    llama = HFTokenizer(AutoTokenizer.from_pretrained(chat_tokenizers["chatml"]), "chatml")
    ids, labels = rows_of([{"messages": CONVERSATIONS[0]}], llama, format="chat", chat_template="default")[0]
    assert ids[-1] == llama.eos_id and labels[-1] == llama.eos_id
    assert llama.decode([t for t in labels if t != IGNORE_INDEX]) == "Seven.</s>"
    assert DEFAULT_CHAT_TEMPLATE.count("eos_token") == 1


def test_prompt_completion_labels_are_the_completion_and_eos(tiny_hf):
    from transformers import AutoTokenizer

    records = [{"prompt": p, "completion": c} for p, c in PAIRS]
    byte = rows_of(records, ByteTokenizer(), format="prompt_completion")
    llama = HFTokenizer(AutoTokenizer.from_pretrained(tiny_hf["llama"]), "llama")
    bpe = rows_of(records, llama, format="prompt_completion")
    hf = llama.tokenizer
    for (prompt, completion), (ids, labels), (bpe_ids, bpe_labels) in zip(PAIRS, byte, bpe):
        assert (ids, labels) == hand_built(byte_encode, [(prompt, False), (completion, True), (EOS, True)])
        expected = hf(prompt)["input_ids"] + hf(completion, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        n_prompt = len(hf(prompt)["input_ids"])
        assert bpe_ids == expected and bpe_ids[0] == hf.bos_token_id  # the tokenizer's BOS before the prompt
        assert bpe_labels == [IGNORE_INDEX] * (n_prompt - 1) + expected[n_prompt:]


def test_too_long_samples_are_truncated_or_dropped_and_counted():
    records = [{"prompt": "p" * 5, "completion": "c" * n} for n in (2, 10, 40)] + [{"prompt": "p" * 30, "completion": "c"}]
    lines = []
    cfg = DataConfig(seq_len=15, pack=False, format="prompt_completion")
    blocks = tokenize_into_blocks(datasets.Dataset.from_list(records), 15, False, ByteTokenizer(), cfg, report=lines.append)
    # 16 ids per row: 5 + 2 + EOS fits; 5 + 10 + EOS fits exactly; 5 + 40 + EOS is cut to 16 (11 targets left);
    # 30 + 1 + EOS is cut inside the prompt: no target left, dropped
    assert blocks[:]["n_targets"].tolist() == [3, 11, 11]
    assert lines == [
        "data: training: of 4 samples, 1 truncated to seq_len + 1 tokens, 1 dropped with no target token left".replace("training", "data")
    ]
    lines.clear()
    cfg = DataConfig(seq_len=15, pack=False, format="prompt_completion", too_long="drop")
    blocks = tokenize_into_blocks(datasets.Dataset.from_list(records), 15, False, ByteTokenizer(), cfg, report=lines.append)
    assert blocks[:]["n_targets"].tolist() == [3, 11] and "2 dropped as longer than seq_len + 1 tokens" in lines[0]


def packed_and_single(tokenizer, seq_len: int) -> tuple:
    """One packed batch of prompt/completion samples, and the same samples one per row."""
    records = [{"prompt": f"Question {i}: what is {i} x {i}?", "completion": f" It is {i * i}." * (1 + i % 3)} for i in range(6)]
    batches = []
    for pack in (True, False):
        cfg = DataConfig(seq_len=seq_len, pack=pack, format="prompt_completion")
        store = RowStore(tokenize_into_blocks(datasets.Dataset.from_list(records), seq_len, pack, tokenizer, cfg))
        batches.append((store, rows_to_batch(store.rows(np.arange(len(store))), len(store), store.width, pin=False)))
    return batches


def test_a_packed_row_has_the_loss_of_its_samples_one_by_one(tiny_hf):
    """Positions restart at each sample and attention stays inside it: the built-in GPT (block-diagonal mask) and the
    Hugging Face Llama and GPT-2 (position ids; transformers masks across the restarts) give a packed row the sum of its
    samples' losses, each run alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.loop import token_loss_sum
    from launcher.models.gpt import GPT

    torch.manual_seed(0)
    models = {"built-in GPT": (GPT(257, 128, n_layer=2, n_head=2, d_model=32), ByteTokenizer(), 127)}
    for arch in ("llama", "gpt2"):
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(tiny_hf[arch]), arch)
        model = AutoModelForCausalLM.from_pretrained(tiny_hf[arch], dtype=torch.float32)
        model.config.use_cache = False  # as the launcher trains it (models/hf.py): with a cache, transformers ignores restarts
        models[arch] = (model, tokenizer, 63)
    for name, (model, tokenizer, seq_len) in models.items():
        model.eval()
        with torch.no_grad():  # larger weights than at initialization: the outputs depend on the context visibly
            for param in model.parameters():
                param.mul_(6 if param.dim() > 1 else 1)
        (packed_store, packed), (single_store, single) = packed_and_single(tokenizer, seq_len)
        assert len(packed_store) < len(single_store) and packed.position_ids is not None, name  # rows hold several samples
        assert int(packed_store.target_counts.sum()) == int(single_store.target_counts.sum()) == int((packed.labels != IGNORE_INDEX).sum())
        with torch.no_grad():
            together = token_loss_sum(model, packed)
            alone = sum(
                token_loss_sum(model, rows_to_batch(single_store.rows(np.array([i])), 1, single_store.width, False)) for i in range(len(single_store))
            )
            assert abs(together.item() - alone.item()) <= 1e-5 * alone.item(), (name, together, alone)
            # without the restarts the samples would see each other: the test can tell the difference
            crossing = F.cross_entropy(logits(model(packed.input_ids)).flatten(0, 1), packed.labels.flatten(), reduction="sum")
            assert abs(crossing.item() - alone.item()) > 1e-3 * alone.item(), (name, crossing, alone)
    gpt = models["built-in GPT"][0]
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # one sample per row: the mask path equals the fused causal path
        torch.testing.assert_close(gpt(ids, position_ids=torch.arange(40).expand(2, 40)), gpt(ids), rtol=1e-5, atol=1e-6)


def logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def chat_records(n: int) -> list[dict]:
    """Conversations whose assistant turns range from 1 to ~60 characters, some with two assistant turns."""
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"Tell me about item {i}, please, in some detail."},
            {"role": "assistant", "content": "ok" if i % 3 == 0 else f"Item {i} is " + "very " * (i % 11) + "good."},
        ]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
        rows.append({"messages": messages})
    return rows


def assistant_loss(model, messages_list) -> tuple[float, int]:
    """Sum of the loss over assistant tokens (the default template, byte-level), built by hand, and their number."""
    total, count = 0.0, 0
    for messages in messages_list:
        ids, labels = hand_built(byte_encode, chat_pieces("default", messages))
        with torch.no_grad():
            out = model(torch.tensor([ids[:-1]]))
        total += F.cross_entropy(out[0], torch.tensor(labels), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += sum(t != IGNORE_INDEX for t in labels)
    return total, count


def test_chat_training_is_exact_however_the_batch_is_split(tmp_path: Path):
    """2 ranks x 2 micro-steps = 1 rank x 4 = 1 rank x 1 big batch on conversations with very different numbers of
    assistant tokens (padded rows); the first logged loss is the mean over the assistant tokens of the step's samples."""
    from launcher.bare_model import build_bare_model

    records = chat_records(18)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(
        tmp_path,
        data={"path": str(data), "format": "chat", "seq_len": 128, "pack": False, "eval_fraction": 0, "shuffle": False},
        train={"max_steps": 6, "max_grad_norm": 0.5},
    )
    path = write_config(tmp_path / "c.yaml", config)
    runs = {}
    for name, (nproc, micro, accumulation) in {"2 ranks x 2": (2, 1, 2), "1 rank x 4": (1, 1, 4), "1 rank x 1 big batch": (1, 4, 1)}.items():
        out = tmp_path / re.sub(r"\W+", "_", name)
        check(
            run_cli(
                "train",
                str(path),
                f"output_dir={out}",
                f"train.micro_batch_size={micro}",
                f"train.gradient_accumulation_steps={accumulation}",
                nproc=nproc,
            )
        )
        runs[name] = ([r for r in metrics(out) if "loss" in r], final_weights(out))
    reference_rows, reference_weights = runs["1 rank x 1 big batch"]
    assert len(reference_rows) == 6 and max(r["grad_norm"] for r in reference_rows) > 0.5
    for name, (rows, weights) in runs.items():
        for row, ref in zip(rows, reference_rows):
            assert abs(row["loss"] - ref["loss"]) < 1e-5 and abs(row["grad_norm"] - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], (name, row)
        for key, tensor in reference_weights.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")

    model, _ = build_bare_model(load_config(path))  # the initial weights
    total, count = assistant_loss(model.eval(), [r["messages"] for r in records[:4]])  # step 1: the first 4 (no shuffle)
    counts = [assistant_loss(model, [r["messages"]])[1] for r in records[:4]]
    assert max(counts) > 4 * min(counts), counts  # very different numbers of assistant tokens
    assert reference_rows[0]["loss"] == pytest.approx(total / count, rel=1e-5)
