"""Chat data as people have it: ShareGPT mapped by data.message_fields / data.roles, named templates pinned to their
families' published text and written into the exported tokenizer, per-turn training (data.train_on, data.train_field),
a DatasetDict's test split for eval, `launcher preview`, and the refusals (one line, exit 2)."""

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from launcher.config import DataConfig
from launcher.data import Encoder, chat_template, prepare_splits, tokenize_into_blocks
from launcher.data.formats import TARGET, unknown_markers
from launcher.errors import UsageError
from launcher.tokenizer import ByteTokenizer, HFTokenizer

from conftest import check, disk_snapshot, hf_config, metrics, run_cli, tiny_config, write_config

EOS = "<|endoftext|>"
SHAREGPT = {"messages_field": "conversations", "message_fields": {"role": "from", "content": "value"}, "roles": {"human": "user", "gpt": "assistant"}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Café?"},
    {"role": "assistant", "content": "Oui, un café."},
]
PINNED = {  # each family's published format, written out by hand
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    "<|im_start|>user\nCafé?<|im_end|>\n<|im_start|>assistant\nOui, un café.<|im_end|>\n",
    "qwen": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    "<|im_start|>user\nCafé?<|im_end|>\n<|im_start|>assistant\nOui, un café.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCafé?"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nOui, un café.<|eot_id|>",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello there</s>[INST] Café? [/INST]Oui, un café.</s>",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello there<end_of_turn>\n"
    "<start_of_turn>user\nCafé?<end_of_turn>\n<start_of_turn>model\nOui, un café.<end_of_turn>\n",
}
# without a system message: Qwen's default one; the generation prompt opens the assistant's turn
PINNED_PROMPTS = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Hi [/INST]",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
}


def sharegpt(messages: list[dict], **extra) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": names[m["role"]], "value": m["content"], **extra.get(str(i), {})} for i, m in enumerate(messages)]


def trained_text(conversations: list[list[dict]], **data) -> list[str]:
    """The text of each sample's trained tokens (byte-level tokenizer, the default template)."""
    cfg = DataConfig(format="chat", **data)
    tokenizer = ByteTokenizer()
    out = Encoder(cfg, tokenizer, chat_template(cfg, tokenizer))({"messages": conversations})
    trained = [bytes(0 if i == 256 else i for i, k in zip(ids, kinds) if k == TARGET).decode() for ids, kinds in zip(out["ids"], out["kinds"])]
    return [text.replace("\x00", EOS) for text in trained]


def test_named_templates_render_their_families_published_text(tiny_hf, chat_tokenizers, tmp_path):
    """The launcher's rendering is the pinned text, and a tokenizer saved with the template renders the same with
    apply_chat_template (transformers' own Jinja), with and without the generation prompt."""
    from transformers import AutoTokenizer

    from launcher.data.templates import NAMED_TEMPLATES

    tokenizer = ByteTokenizer()
    for name, pinned in PINNED.items():
        cfg = DataConfig(format="chat", chat_template=name)
        encoder = Encoder(cfg, tokenizer, chat_template(cfg, tokenizer))
        assert encoder.render(CONVERSATION)[0] == pinned, name
        hf = AutoTokenizer.from_pretrained(tiny_hf["llama"])
        hf.chat_template = NAMED_TEMPLATES[name]
        hf.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == pinned, name
        assert loaded.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True) == PINNED_PROMPTS[name], name
    # a tokenizer without the family's special tokens trains them as pieces: said, once; with them, nothing said
    plain = HFTokenizer(AutoTokenizer.from_pretrained(tiny_hf["llama"]), "tiny")
    assert unknown_markers(DataConfig(format="chat", chat_template="chatml"), plain) == (
        "launcher: warning: data.chat_template: chatml's <|im_start|>, <|im_end|> are not tokens of tokenizer 'tiny' (each becomes"
        " several pieces); it trains, but not with the family's ids: use the family's tokenizer, or add them as special tokens"
        " (model.resize_embeddings: true)"
    )
    chatml = HFTokenizer(AutoTokenizer.from_pretrained(chat_tokenizers["chatml"]), "chatml")
    assert unknown_markers(DataConfig(format="chat", chat_template="chatml"), chatml) is None
    with pytest.raises(UsageError) as err:
        chat_template(DataConfig(format="chat", chat_template="chatm"), tokenizer)
    assert err.value.lines[0] == (
        "data.chat_template: no template is named 'chatm' (names: chatml, qwen, llama3, mistral, gemma, default); use one of them,"
        " a Jinja file, or null for the tokenizer's own"
    )


def test_per_turn_training_follows_train_on_and_the_message_flags():
    rows = [sharegpt(CONVERSATION), sharegpt(CONVERSATION, **{"2": {"train": False}}), sharegpt(CONVERSATION, **{"1": {"train": True}})]
    first, second = "Hello there" + EOS, "Oui, un café." + EOS
    assert trained_text(rows, **SHAREGPT) == [first + second] * 3  # no data.train_field: the flags are not read
    assert trained_text(rows, **SHAREGPT, train_field="train") == [first + second, second, "<|user|>\nHi\n" + first + second]
    assert trained_text(rows, **SHAREGPT, train_field="train", train_on="last_assistant") == [second, second, "<|user|>\nHi\n" + second]
    everything = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello there" + EOS + "<|user|>\nCafé?\n<|assistant|>\nOui, un café." + EOS
    weights = [sharegpt(CONVERSATION, **{"1": {"weight": 0}}), sharegpt(CONVERSATION, **{"4": {"weight": 0.0}})]
    assert trained_text(weights, **SHAREGPT, train_field="weight", train_on="all") == [
        everything[1:].replace("<|user|>\nHi\n", "", 1),
        everything[1:].removesuffix("Oui, un café." + EOS),
    ]


def load_error(tmp_path: Path, rows: list[dict], **data) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError) as err:
        prepare_splits(DataConfig(path=path, eval_fraction=0, **data), 0)
    return err.value.lines[0].replace(str(path), "FILE")


def test_bad_chat_input_is_one_line_naming_row_key_and_fix(tmp_path: Path):
    good = sharegpt(CONVERSATION)
    chat = {"format": "chat", **SHAREGPT}
    assert load_error(tmp_path, [{"conversations": good}], format="chat", messages_field="conversations") == (
        "data.message_fields: row 1 of 'FILE': message 1 has no 'role' key (its keys: from, value); set data.message_fields.role"
        " to the key that holds the role (ShareGPT: data.message_fields: {role: from, content: value})"
    )
    assert load_error(tmp_path, [{"conversations": good}], **{**chat, "message_fields": {"role": "speaker", "content": "value"}}) == (
        "data.message_fields: row 1 of 'FILE': message 1 has no 'speaker' key (its keys: from, value); set data.message_fields.role"
        " to the key that holds the role (ShareGPT: data.message_fields: {role: from, content: value})"
    )
    bot = [{"conversations": good}, {"conversations": [*good[:2], {"from": "bot", "value": "Hey"}]}]
    assert load_error(tmp_path, bot, **chat) == (
        "data.roles: row 2 of 'FILE': message 3 has the unknown role 'bot'; map it to one of system, user, assistant, tool with"
        " data.roles, e.g. {bot: assistant}"
    )
    flagged = [{"conversations": sharegpt(CONVERSATION, **{"2": {"train": "no"}})}]
    assert load_error(tmp_path, flagged, **chat, train_field="train") == (
        "data.train_field: row 1 of 'FILE': message 3's 'train' is str \"no\"; make it true/false or 0/1 (a turn trains fully or not at all)"
    )
    assert (
        load_error(tmp_path, [{"messages": CONVERSATION}])
        == "data.format: 'FILE' has no column 'text' but a 'messages' column of conversations; set data.format: chat"
    )
    # a dataset that would train on nothing, or on everything where only the assistant should train: refused with the count
    off = [{"conversations": sharegpt(CONVERSATION, **{"2": {"train": False}, "4": {"train": False}})}] * 3
    assert load_error(tmp_path, off, **chat, train_field="train") == (
        "data.train_on: none of the 3 training samples has a trained token; check data.roles (which role is the assistant's),"
        " data.train_field and data.train_on (launcher preview CONFIG shows them)"
    )
    bare = tmp_path / "bare.jinja"  # no role headers: with every role mapped to assistant, every token trains
    bare.write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    everyone = {**chat, "roles": {"human": "assistant", "gpt": "assistant", "system": "assistant"}, "chat_template": str(bare)}
    assert load_error(tmp_path, [{"conversations": good}] * 2, **everyone) == (
        "data.train_on: assistant, but every token of all 2 training samples is trained (no prompt is context); check data.roles"
        " (the user's role must not map to assistant), data.train_field and the template (launcher preview CONFIG shows them)"
    )
    blocks = tokenize_into_blocks(datasets.Dataset.from_list([{"messages": CONVERSATION}]), 128, False, ByteTokenizer(), DataConfig(format="chat"))
    assert len(blocks) == 1  # the same conversation with its roles as they are trains


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.message_fields={}"], "data.message_fields: row 1 of '{data}': message 1 has no 'role' key (its keys: from, value);"),
        (["data.chat_template=chatm"], "data.chat_template: no template is named 'chatm' (names: chatml, qwen, llama3, mistral, gemma, default);"),
    ],
)
def test_bad_chat_config_stops_train_with_one_line_and_exit_2(tmp_path: Path, overrides: list[str], expected: str):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text(json.dumps({"conversations": sharegpt(CONVERSATION)}) + "\n")
    config = tiny_config(tmp_path, data={"path": str(data), "format": "chat", "eval_fraction": 0, **SHAREGPT})
    path = write_config(tmp_path / "c.yaml", config)
    before = disk_snapshot(tmp_path, folders=True)
    proc = run_cli("train", str(path), *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("launcher: error: " + expected.replace("{data}", str(data))), lines[0]
    assert disk_snapshot(tmp_path, folders=True) == before


# a ChatML template that marks the assistant's tokens for transformers (return_assistant_tokens_mask): the reference
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)


def conversations(n: int, offset: int) -> list[list[dict]]:
    rows = []
    for i in range(offset, offset + n):
        messages = [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}." + " Sure." * (i % 4)}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Answer with a number."}, *messages, {"role": "user", "content": "Thanks"}]
            messages.append({"role": "assistant", "content": "You are welcome."})
        rows.append(messages)
    return rows


@pytest.fixture(scope="module")
def sharegpt_runs(tiny_hf, tmp_path_factory):
    """A ShareGPT DatasetDict folder (train and test splits) fine-tuned with LoRA and the chatml template: 2 ranks x 2
    and 1 rank x 4, 2 steps each, the test split evaluated at step 0."""
    tmp = tmp_path_factory.mktemp("sharegpt")
    splits = {"train": conversations(16, 0), "test": conversations(6, 100)}
    folder = tmp / "sharegpt"
    datasets.DatasetDict({k: datasets.Dataset.from_list([{"conversations": sharegpt(c)} for c in v]) for k, v in splits.items()}).save_to_disk(folder)
    config = hf_config(
        tmp,
        tiny_hf["llama"],
        data={"path": str(folder), "format": "chat", "chat_template": "chatml", "seq_len": 192, "pack": False, **SHAREGPT},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        export={"merge_lora": True},
        train={"max_steps": 2, "learning_rate": 1e-2},
        eval={"at_start": True},
    )
    del config["data"]["eval_fraction"]  # the folder's test split evaluates
    path = write_config(tmp / "c.yaml", config)
    runs = {}
    for name, (nproc, accumulation) in {"2 ranks x 2": (2, 2), "1 rank x 4": (1, 4)}.items():
        out = tmp / re.sub(r"\W+", "_", name)
        proc = run_cli(
            "train", str(path), f"output_dir={out}", "train.micro_batch_size=1", f"train.gradient_accumulation_steps={accumulation}", nproc=nproc
        )
        runs[name] = (check(proc), out)
    return runs, splits


def test_sharegpt_trains_on_exactly_the_assistant_tokens(sharegpt_runs, tiny_hf):
    """The step-0 eval loss is the mean over the test split's assistant tokens, computed by transformers from its own
    assistant mask; 2 ranks x 2 = 1 rank x 4; the exported tokenizers (final/, final/merged/) render as training did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs, splits = sharegpt_runs
    proc, out = runs["1 rank x 4"]
    assert f"data: evaluating on the 'test' split of '{out.parent / 'sharegpt'}'" in proc.stdout
    assert "launcher: warning: data.chat_template: chatml's <|im_start|>, <|im_end|> are not tokens" in proc.stdout
    rows = {name: metrics(run_out) for name, (_, run_out) in runs.items()}
    evals = {name: [r for r in got if "eval_loss" in r] for name, got in rows.items()}
    assert [r["step"] for r in evals["1 rank x 4"]] == [0, 2]

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf["llama"])
    tokenizer.chat_template = CHATML_MARKED
    model = AutoModelForCausalLM.from_pretrained(tiny_hf["llama"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    for messages in splits["test"]:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = torch.tensor(encoded["input_ids"]), torch.tensor(encoded["assistant_masks"], dtype=torch.bool)
        with torch.no_grad():
            losses = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:], reduction="none")
        total, count = total + losses[mask[1:]].sum().item(), count + int(mask[1:].sum())
    assert evals["1 rank x 4"][0]["eval_tokens"] == count
    assert evals["1 rank x 4"][0]["eval_loss"] == pytest.approx(total / count, abs=1e-4)

    for mine, ref in zip(rows["2 ranks x 2"], rows["1 rank x 4"], strict=True):
        for key in ("loss", "eval_loss"):
            if key in ref:
                assert abs(mine[key] - ref[key]) < 1e-5, (key, mine, ref)

    cfg = DataConfig(format="chat", chat_template="chatml")
    trained = Encoder(cfg, ByteTokenizer(), chat_template(cfg, ByteTokenizer()))
    for folder in (out / "final", out / "final" / "merged"):
        exported = AutoTokenizer.from_pretrained(folder)
        assert exported.apply_chat_template(CONVERSATION, tokenize=False) == trained.render(CONVERSATION)[0] == PINNED["chatml"], folder


def test_preview_marks_the_trained_tokens_rows_and_cuts(tmp_path: Path):
    data = tmp_path / "sharegpt.jsonl"
    rows = [sharegpt(CONVERSATION[:3]), sharegpt([CONVERSATION[1], {"role": "assistant", "content": "Hello, " * 12}])]
    data.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    config = {"data": {"path": str(data), "format": "chat", "eval_fraction": 0, "seq_len": 64, **SHAREGPT}, "train": {"max_steps": 1}}
    proc = check(run_cli("preview", str(write_config(tmp_path / "c.yaml", config)), "--ids", "--n", "2"))
    assert proc.stdout == (
        "══ row 1: sample 1, 59 of 65 tokens\n"
        "── sample 1: 59 tokens, 12 trained\n"
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n[[Hello there<|endoftext|>]]\n"
        "ids: 60 124 115 121 115 116 101 109 124 62 10 66 101 32 98 114 105 101 102 46 10 60 124 117 115 101 114 124 62 10 72 105 10"
        " 60 124 97 115 115 105 115 116 97 110 116 124 62 10 [[72 101 108 108 111 32 116 104 101 114 101 256]]\n"
        "══ row 2: sample 2, 65 of 65 tokens\n"
        "── sample 2: 65 tokens, 39 trained, truncated from 111 to 65 tokens\n"
        "<|user|>\nHi\n<|assistant|>\n[[Hello, Hello, Hello, Hello, Hello, Hell]]\n"
        "ids: 60 124 117 115 101 114 124 62 10 72 105 10 60 124 97 115 115 105 115 116 97 110 116 124 62 10 [["
        + " ".join(map(str, b"Hello, Hello, Hello, Hello, Hello, Hell"))
        + "]]\n"
        "summary: 2 training samples (2 shown); 0 (0.0%) with no trained token, 1 truncated, 0 dropped; 97 of 170 tokens trained (57.1%)\n"
    )
