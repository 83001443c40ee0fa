"""eval.generate: at each evaluation the main process writes the model's greedy answers to samples.jsonl, and the run's
numbers are those of the same run without it (2 DDP ranks: the unwrapped module on the main process only)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launcher.config import DataConfig, load_config
from launcher.data import EvalData, prepare_splits
from launcher.errors import UsageError
from launcher.generate import held_out_prompt_ids
from launcher.models import logits_of
from launcher.models.gpt import GPT

from conftest import check, final_weights, metrics, run_cli, tiny_config, write_config

PROMPTS = ["the quick", "a lazy dog"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """4 steps on 2 ranks evaluated at steps 0, 2 and 4: with eval.generate (listed prompts), and without."""
    tmp_path = tmp_path_factory.mktemp("generate")
    config = tiny_config(
        tmp_path,
        model={"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1},  # dropout draws from the RNG that generation must leave alone
        train={"micro_batch_size": 1, "lr_schedule": "constant", "warmup_steps": 0},
        eval={"at_start": True, "every_steps": 2},
    )
    path = write_config(tmp_path / "c.yaml", config)
    generate = f"eval.generate={{prompts: [{', '.join(PROMPTS)}], max_new_tokens: 6}}"
    check(run_cli("train", str(path), f"output_dir={tmp_path / 'with'}", generate, "checkpoint.every_steps=2", nproc=2))
    check(run_cli("train", str(path), f"output_dir={tmp_path / 'without'}", "checkpoint.every_steps=2", nproc=2))
    return {"with": tmp_path / "with", "without": tmp_path / "without", "config": path}


def test_samples_jsonl_has_the_greedy_answers_at_each_evaluation(runs):
    rows = [json.loads(line) for line in (runs["with"] / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(step, p) for step in (0, 2, 4) for p in PROMPTS]  # once: the main process
    # each answer is the greedy continuation of the weights of that step, recomputed here by hand
    for row in rows:
        if row["step"] == 0:  # the initial weights: no file holds them
            continue
        model = GPT(vocab_size=257, seq_len=32, n_layer=2, n_head=2, d_model=32)
        model.load_state_dict(load_file(str(runs["with"] / "checkpoints" / f"step-{row['step']:09d}" / "model.safetensors")))
        model.eval()
        ids = list(row["prompt"].encode())
        answer = []
        for _ in range(6):
            token = int(logits_of(model(torch.tensor([ids[-32:]])))[0, -1].argmax())
            if token == 256:
                break
            answer.append(token)
            ids.append(token)
        assert row["answer"] == bytes(t for t in answer if t < 256).decode("utf-8", errors="replace")
        assert row["new_tokens"] == len(answer)


def test_generating_changes_nothing_the_run_computes(runs):
    with_, without = final_weights(runs["with"]), final_weights(runs["without"])
    assert with_.keys() == without.keys() and all(torch.equal(with_[k], without[k]) for k in with_)
    losses = lambda out: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in metrics(out)]  # noqa: E731
    assert losses(runs["with"]) == losses(runs["without"])
    assert not (runs["without"] / "samples.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, error",
    [
        (["eval.generate={max_new_tokens: 0}"], "eval.generate.max_new_tokens: input should be greater than or equal to 1 (got 0)"),
        (
            ["eval.generate={}", "fsdp={}"],
            "(top level): eval.generate: not available with fsdp (each generated token would need every rank's forward)",
        ),
        (["eval.generate={}", "data.eval_fraction=0"], "(top level): eval.generate: there is no evaluation set"),
    ],
)
def test_bad_generate_settings_are_one_line(tmp_path, overrides, error):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    with pytest.raises(UsageError) as err:
        load_config(path, overrides)
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(f"{path}: {error}"), err.value.lines


def test_prompts_from_the_evaluation_set_are_what_precedes_the_answer(tmp_path):
    """prompt_completion (and chat): the ids before the first target; text: the first half of the row."""
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}? ", "completion": f"answer {i}"}) + "\n" for i in range(4)))
    held_out = prepare_splits(DataConfig(path=data, format="prompt_completion", seq_len=32, eval_fraction=0), seed=1)[0]
    prompts = held_out_prompt_ids(EvalData(held_out, 0, 1, 2, None, False), 3)
    assert [bytes(p).decode() for p in prompts] == ["question 0? ", "question 1? ", "question 2? "]
    text = prepare_splits(DataConfig(path=data, text_field="prompt", seq_len=32, pack=False, eval_fraction=0), seed=1)[0]
    first = EvalData(text, 0, 1, 2, None, False).store.rows(np.arange(1))
    assert held_out_prompt_ids(EvalData(text, 0, 1, 2, None, False), 1) == [first["input_ids"][0, : first["length"][0] // 2].tolist()]
