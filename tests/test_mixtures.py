"""data.sources: two sources mixed 3:1 by weight sample 75% of the target tokens from the first (counted here from the
rows' own text, not from the mixture's books), the same rows on 1 and 2 ranks, a bitwise resume, a resume with
changed weights refused; bad mixtures refused with one line naming the key."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.batches import BatchLayout
from launcher.config import DataConfig, load_config
from launcher.data import IGNORE_INDEX, TrainData, make_mixture, prepare_splits
from launcher.errors import UsageError

from conftest import check, disk_snapshot, final_weights, metrics, one_error_line, run_cli, tiny_config, write_config

LETTERS, DIGITS = "abcdefghij", "0123456789"


def write_source(path: Path, alphabet: str, n_docs: int) -> Path:
    """Documents of one alphabet only, so a row's source can be read off its ids."""
    path.write_text("".join(json.dumps({"text": alphabet * (3 + i % 4)}) + "\n" for i in range(n_docs)))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Source a (letters) is the smaller, so a 3:1 mixture samples it several times per pass over b (digits)."""
    tmp_path = tmp_path_factory.mktemp("sources")
    return {"a": write_source(tmp_path / "a.jsonl", LETTERS, 40), "b": write_source(tmp_path / "b.jsonl", DIGITS, 100), "tmp": tmp_path}


def mixture_data(sources: dict, weights=(3, 1)) -> dict:
    return {
        "path": None,
        "sources": [{"path": str(sources["a"]), "weight": weights[0]}, {"path": str(sources["b"]), "weight": weights[1]}],
        "seq_len": 32,
        "pack": True,
        "eval_fraction": 0.1,
    }


def tokens_by_alphabet(train_data: TrainData, steps: range) -> np.ndarray:
    """Target tokens of the steps' rows, by the alphabet of the row's ids: [letters, digits]."""
    counts = np.zeros(2, dtype=np.int64)
    for step in steps:
        for batch in train_data.window(step).micro_batches:
            for ids, labels in zip(batch.input_ids, batch.labels):
                n = int((labels != IGNORE_INDEX).sum())
                letters = bool(((ids >= ord("a")) & (ids <= ord("j"))).any())
                digits = bool(((ids >= ord("0")) & (ids <= ord("9"))).any())
                assert n == 0 or letters != digits, "a row holds text of both sources"
                counts[0 if letters else 1] += n
    return counts


def rows_of(train_data: TrainData, step: int) -> list[tuple]:
    return sorted(tuple(ids.tolist()) for batch in train_data.window(step).micro_batches for ids in batch.input_ids)


def test_weights_3_to_1_sample_75_percent_of_tokens_over_200_steps_on_any_split_of_the_batch(sources):
    cfg = DataConfig(**mixture_data(sources))
    train, held_out = prepare_splits(cfg, seed=1)
    assert [np.unique(rows[:]["source"]).tolist() for rows in (train, held_out)] == [[0, 1], [0, 1]]
    one_rank = TrainData(train, BatchLayout(2, 2, 1), 0, 1, True, False, mixture=make_mixture(cfg, train, 1))
    counts = tokens_by_alphabet(one_rank, range(200))
    assert abs(counts[0] / counts.sum() - 0.75) <= 0.02, counts
    # the mixture's own count of what it sampled agrees with the count from the text
    assert one_rank.mixture.sampled_tokens.tolist() == counts.tolist()
    # 2 ranks x 1 sample take, together, the rows of 1 rank x 2 samples, step by step
    two_ranks = [TrainData(train, BatchLayout(1, 2, 2), rank, 1, True, False, mixture=make_mixture(cfg, train, 1)) for rank in (0, 1)]
    for step in (0, 57, 199):  # any step, directly (an epoch is 44 steps here)
        assert sorted(rows_of(two_ranks[0], step) + rows_of(two_ranks[1], step)) == rows_of(one_rank, step)


@pytest.fixture(scope="module")
def runs(sources) -> dict:
    """8 steps of a 3:1 mixture: straight on 1 rank; on 2 ranks; 4 steps with a checkpoint, then resumed to 8."""
    tmp_path = sources["tmp"]
    config = tiny_config(
        tmp_path,
        data=mixture_data(sources),
        train={"max_steps": 8, "learning_rate": 3e-3, "lr_schedule": "constant", "warmup_steps": 0, "log_every": 1},
    )
    path = write_config(tmp_path / "c.yaml", config)
    one = check(run_cli("train", str(path), f"output_dir={tmp_path / 'one'}"))
    two = check(run_cli("train", str(path), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=1", nproc=2))
    half = ("train", str(path), f"output_dir={tmp_path / 'resumed'}", "checkpoint.every_steps=4")
    check(run_cli(*half, "train.max_steps=4"))
    resumed = check(run_cli(*half, "resume=auto"))
    return {"config": path, "one": one, "two": two, "resumed": resumed, "tmp": tmp_path}


def test_the_plan_is_printed_at_start_and_what_was_sampled_at_the_end(runs, sources):
    a, b = sources["a"], sources["b"]
    assert (
        f"data: mixture of 2 sources, 177 rows per epoch: data.sources.0 '{a}' (weight 75.0%, 51 rows, 133 per epoch:"
        f" 75.0% of target tokens); data.sources.1 '{b}' (weight 25.0%, 126 rows, 44 per epoch: 25.0% of target tokens)"
    ) in runs["one"].stdout
    cfg = DataConfig(**mixture_data(sources))
    train, _ = prepare_splits(cfg, seed=1)
    counts = tokens_by_alphabet(TrainData(train, BatchLayout(2, 2, 1), 0, 1, True, False, mixture=make_mixture(cfg, train, 1)), range(8))
    shares = counts / counts.sum()
    assert (
        f"data: mixture sampled over steps 1-8, of {counts.sum()} target tokens: data.sources.0 '{a}' {100 * shares[0]:.1f}% (planned 75.0%);"
        f" data.sources.1 '{b}' {100 * shares[1]:.1f}% (planned 25.0%)"
    ) in runs["one"].stdout
    sampled = metrics(runs["tmp"] / "one")[-1]["mixture_sampled"]
    assert list(sampled.values()) == shares.tolist()


def test_the_mixture_equals_itself_on_1_and_2_ranks(runs):
    one, two = final_weights(runs["tmp"] / "one"), final_weights(runs["tmp"] / "two")
    for name, tensor in one.items():  # the ranks sum in another order: 1e-5, as in test_exact_accumulation
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    rows_one, rows_two = metrics(runs["tmp"] / "one"), metrics(runs["tmp"] / "two")
    assert [r["loss"] for r in rows_two if "loss" in r] == pytest.approx([r["loss"] for r in rows_one if "loss" in r], rel=1e-6)
    assert rows_two[-1] == rows_one[-1]  # the same rows sampled: the same shares, exactly


def test_a_resumed_mixture_equals_the_straight_run_bitwise(runs):
    assert "resumed from" in runs["resumed"].stdout
    one, resumed = final_weights(runs["tmp"] / "one"), final_weights(runs["tmp"] / "resumed")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in one.items())


def test_a_resume_with_changed_weights_is_refused(runs, sources):
    out = runs["tmp"] / "resumed"
    before = disk_snapshot(out)
    changed = json.dumps(mixture_data(sources, weights=(1, 1))["sources"]).replace('"', "")
    line = one_error_line(run_cli("train", str(runs["config"]), f"output_dir={out}", "resume=auto", f"data.sources={changed}"))
    assert line.startswith(f"launcher: error: resume: the config differs from checkpoint '{out / 'checkpoints' / 'step-000000008'}'")
    assert "data.sources [{" in line and "'weight': 3.0" in line and "'weight': 1.0" in line
    assert disk_snapshot(out) == before


@pytest.mark.parametrize(
    "override, error",
    [
        (
            "data.sources=[{path: A, weight: 0}]",
            "data.sources.0.weight: input should be greater than 0 (got 0); set data.sources.0.weight to more than 0.0",
        ),
        ("data.sources=[{path: MISSING, weight: 1}]", "data.sources.0.path: file 'MISSING' not found; point it at an existing file"),
        ("data.sources=[{path: A, weight: 1, fmt: chat}]", "unknown key 'data.sources.0.fmt'; did you mean 'data.sources.0.format'?"),
        (
            "data.sources=[{path: A, weight: 1, messages_field: m}]",
            "data: data.sources.0.messages_field: not read with format text; remove it, or set that source's format",
        ),
        (
            "data.sources=[{path: A, weight: 1}, {path: A, epochs: 2}]",
            "data: data.sources: give every source a weight (its share of tokens), or every source epochs",
        ),
        ("data.path=A", "data: data.path and data.sources both choose the training data; keep one of them"),
    ],
)
def test_a_bad_mixture_is_one_line_naming_the_key(sources, override, error):
    path = write_config(sources["tmp"] / "bad.yaml", tiny_config(sources["tmp"], data=mixture_data(sources)))
    override = override.replace("MISSING", str(sources["tmp"] / "missing.jsonl")).replace("A", str(sources["a"]))
    with pytest.raises(UsageError) as err:
        load_config(path, [override])
    assert len(err.value.lines) == 1
    assert err.value.lines[0].startswith(f"{path}: {error.replace('MISSING', str(sources['tmp'] / 'missing.jsonl'))}")


def test_a_bad_mixture_exits_2_with_one_line_and_writes_nothing(sources):
    path = write_config(sources["tmp"] / "bad-cli.yaml", tiny_config(sources["tmp"], data=mixture_data(sources, weights=(3, -1))))
    before = disk_snapshot(sources["tmp"])
    line = one_error_line(run_cli("train", str(path)))
    assert line == (
        f"launcher: error: {path}: data.sources.1.weight: input should be greater than 0 (got -1); set data.sources.1.weight to more than 0.0"
    )
    assert disk_snapshot(sources["tmp"]) == before
