"""Data sources: save_to_disk folders (Dataset and DatasetDict), folders and globs of files, separate evaluation files,
load_dataset by name (a local folder, offline); each trains and resumes bitwise. Bad data input: one line, exit 2,
nothing on disk changed."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from launcher.config import DataConfig, load_config
from launcher.data import load_documents, prepare_splits, target_counts

from conftest import disk_snapshot, final_weights, metrics, reset_accelerate, run_cli, tiny_config, write_config, write_documents


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.fixture
def sources(tmp_path: Path) -> dict:
    """name: (data section, the training texts in order, the evaluation texts or None); the files they read."""
    docs = write_documents(tmp_path / "docs.jsonl", 30)
    held = write_documents(tmp_path / "held.jsonl", 6, seed=5)
    train_texts, eval_texts = texts_of(docs), texts_of(held)
    datasets.Dataset.from_dict({"text": train_texts, "id": list(range(30))}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": train_texts}), "validation": datasets.Dataset.from_dict({"text": eval_texts})}
    ).save_to_disk(str(tmp_path / "saved-dict"))
    (tmp_path / "shards").mkdir()
    for k in range(3):  # part-0 .. part-2: the glob and the folder read them in name order
        (tmp_path / "shards" / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts[k * 10 : (k + 1) * 10]))
    named = tmp_path / "named-dataset" / "data"
    named.mkdir(parents=True)
    (named / "train.jsonl").write_text(docs.read_text())
    (named / "validation.jsonl").write_text(held.read_text())
    no_eval = {"eval_fraction": 0}
    return {
        "save_to_disk Dataset": ({"path": str(tmp_path / "saved"), **no_eval}, train_texts, None),
        "save_to_disk DatasetDict": ({"path": str(tmp_path / "saved-dict"), "split": "train", "eval_split": "validation"}, train_texts, eval_texts),
        "glob": ({"path": str(tmp_path / "shards" / "part-*.jsonl"), **no_eval}, train_texts, None),
        "folder of files": ({"path": str(tmp_path / "shards"), "eval_path": str(held)}, train_texts, eval_texts),
        "load_dataset by name": ({"name": str(tmp_path / "named-dataset"), "eval_split": "validation"}, train_texts, eval_texts),
    }


@pytest.fixture
def offline(monkeypatch):
    """No hub: load_dataset by name must resolve the local folder (the datasets library read the variable at import)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_every_source_gives_its_rows_in_order(sources, offline):
    for name, (data, train_texts, eval_texts) in sources.items():
        cfg = DataConfig(**data)
        assert load_documents(cfg)["text"] == train_texts, name
        if eval_texts is not None:
            assert load_documents(cfg, evaluation=True)["text"] == eval_texts, name


def train_in_process(config: dict, tmp_path: Path, out: str, *overrides: str) -> Path:
    from launcher.build import build_run
    from launcher.loop import train

    reset_accelerate()
    cfg = load_config(write_config(tmp_path / f"{out}.yaml", {**config, "output_dir": str(tmp_path / out)}), list(overrides))
    train(build_run(cfg))
    return tmp_path / out


def test_every_source_trains_and_resumes_bitwise(sources, tmp_path: Path, offline, fresh_accelerate):
    """Straight 4 steps, and 2 steps then resumed to 4: the same weights bit for bit and the same losses; with an
    evaluation set, its loss is over exactly its target tokens. The save_to_disk folders are left as they were."""
    before = disk_snapshot(tmp_path, folders=True)
    for name, (data, _, eval_texts) in sources.items():
        config = tiny_config(tmp_path, train={"lr_schedule": "constant", "max_steps": 4}, checkpoint={"every_steps": 2})
        config["data"] = {**data, "seq_len": 32, "pack": True}
        tag = name.replace(" ", "-")
        straight = train_in_process(config, tmp_path, f"{tag}-straight")
        resumed = train_in_process(config, tmp_path, f"{tag}-resumed", "train.max_steps=2")
        train_in_process(config, tmp_path, f"{tag}-resumed", "resume=auto")
        reference = final_weights(straight)
        for key, tensor in final_weights(resumed).items():
            assert torch.equal(tensor, reference[key]), f"{name}: {key}"
        losses = [r["loss"] for r in metrics(straight) if "loss" in r]
        assert len(losses) == 4 and [r["loss"] for r in metrics(resumed) if "loss" in r] == losses, name
        evals = [r for r in metrics(straight) if "eval_loss" in r]
        assert bool(evals) == (eval_texts is not None), name
        if evals:
            cfg = load_config(tmp_path / f"{tag}-straight.yaml")
            assert evals[-1]["eval_tokens"] == int(target_counts(prepare_splits(cfg.data, cfg.seed)[1]).sum())
            n_ids = sum(len(t.encode()) + 1 for t in eval_texts)  # each text and its EOS, packed in rows of 33
            assert evals[-1]["eval_tokens"] == n_ids - -(-n_ids // 33)  # every id but each row's first is a target
    after = disk_snapshot(tmp_path, folders=True)
    for folder in ("saved", "saved-dict", "shards", "named-dataset"):
        assert {k: v for k, v in after.items() if k.startswith(folder)} == {k: v for k, v in before.items() if k.startswith(folder)}


BAD_FILES = {  # file name -> content (bytes); the data each case reads
    "pc_no_prompt.jsonl": b'{"question": "q", "completion": "c"}\n',
    "pc_null.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": null}\n',
    "pc_number.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": 7, "completion": "c"}\n',
    "chat_role.jsonl": (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n'
    ),
    "chat_no_assistant.jsonl": b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
    "chat_broken.jsonl": (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' * 2
        + b'{"messages": [{"role": "user", "content": "a"}\n'
    ),
    "chat_ok.jsonl": b'{"messages": [{"role": "user", "content": "a question"}, {"role": "assistant", "content": "an answer"}]}\n' * 4,
    "reversed.jinja": b"{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}",
    "empty.jsonl": b"",
    "blank.txt": b"  \n\n \t\n",
    "latin1.txt": "first paragraph\n\ncaf\u00e9 au lait\n".encode("latin-1"),
    "latin1.jsonl": '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"),
}
CHAT = ["data.format=chat", "data.eval_fraction=0"]
BAD_DATA = {  # name: (overrides, expected text in the one line)
    "missing field": (
        ["data.path={tmp}/pc_no_prompt.jsonl", "data.format=prompt_completion"],
        "data.prompt_field: '{tmp}/pc_no_prompt.jsonl' has no column 'prompt' (columns: question, completion); set data.prompt_field",
    ),
    "null field": (
        ["data.path={tmp}/pc_null.jsonl", "data.format=prompt_completion"],
        "data.path: row 2 of '{tmp}/pc_null.jsonl' has no 'completion' (null or missing)",
    ),
    "number field": (
        ["data.path={tmp}/pc_number.jsonl", "data.format=prompt_completion"],
        "'{tmp}/pc_number.jsonl' line 3: 'prompt' is int 7, not text; make it a string (or set data.prompt_field)",
    ),
    "unknown role": (
        ["data.path={tmp}/chat_role.jsonl", *CHAT],
        "data.roles: row 2 of '{tmp}/chat_role.jsonl': message 2 has the unknown role 'bot'; map it to one of system, user, assistant,"
        " tool with data.roles, e.g. {bot: assistant}",
    ),
    "no assistant turn": (["data.path={tmp}/chat_no_assistant.jsonl", *CHAT], "row 1 of '{tmp}/chat_no_assistant.jsonl' has no assistant turn"),
    "malformed JSON line": (["data.path={tmp}/chat_broken.jsonl", *CHAT], "'{tmp}/chat_broken.jsonl' line 3 is not valid JSON"),
    "no chat template": (
        ["data.path={tmp}/chat_ok.jsonl", *CHAT, "tokenizer={llama}"],
        "data.chat_template: tokenizer '{llama}' has no chat template; set data.chat_template to a name (chatml, qwen,",
    ),
    "template without growing turns": (
        ["data.path={tmp}/chat_ok.jsonl", *CHAT, "data.chat_template={tmp}/reversed.jinja"],
        "data.chat_template: the template does not render a conversation as the growing text of its turns",
    ),
    "all dropped as too long": (
        ["data.path={tmp}/chat_ok.jsonl", *CHAT, "data.too_long=drop", "data.seq_len=8"],
        "data.too_long: every one of the 4 training samples is dropped (4 longer than seq_len + 1 = 9 tokens",
    ),
    "empty file": (["data.path={tmp}/empty.jsonl"], "data.path: '{tmp}/empty.jsonl' is empty; put data in it or remove it"),
    "whitespace-only file": (["data.eval_path={tmp}/blank.txt", "data.eval_fraction=0"], "data.eval_path: '{tmp}/blank.txt' is whitespace only"),
    "non-UTF-8 text": (["data.path={tmp}/latin1.txt"], "data.path: '{tmp}/latin1.txt' is not UTF-8: byte 0xe9 at line 3 (byte offset 20)"),
    "non-UTF-8 JSON lines": (["data.path={tmp}/latin1.jsonl"], "'{tmp}/latin1.jsonl' is not UTF-8: byte 0xe9 at line 2"),
    "split not in the folder": (["data.path={tmp}/dict", "data.split=test"], "data.split: '{tmp}/dict' has no split 'test' (splits: train)"),
    "eval_split of a plain file": (["data.eval_split=validation", "data.eval_fraction=0"], "data.eval_split: '{tmp}/docs.jsonl' has no splits"),
    "glob matching nothing": (["data.path={tmp}/nothing-*.jsonl"], "data.path: the pattern '{tmp}/nothing-*.jsonl' matches no file"),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_bad_data_is_one_line_and_changes_nothing(tiny_hf, tmp_path: Path, name: str):
    for file, content in BAD_FILES.items():
        (tmp_path / file).write_bytes(content)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(tmp_path / "dict"))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    overrides, expected = BAD_DATA[name]
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{llama}", str(tiny_hf["llama"]))  # noqa: E731
    before = disk_snapshot(tmp_path, folders=True)
    proc = run_cli("train", str(config), *map(fill, overrides))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("launcher: error: ") and fill(expected) in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert disk_snapshot(tmp_path, folders=True) == before
