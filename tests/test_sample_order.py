"""How an epoch's samples are ordered at any corpus size: a shuffled array up to batches.ARRAY_ORDER_MAX rows, a keyed
permutation computed per step above it (nothing held per row), and a resumed run keeps the order its checkpoint
recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import launcher.batches
from launcher.batches import BatchLayout
from launcher.data import TrainData
from tests.conftest import check, final_weights, metrics, run_cli, tiny_config, write_config


class Rows:
    """n rows whose ids are their own index: a window's rows tell which samples it took."""

    def __init__(self, n: int):
        self.width, self.pad_id, self.n = 3, 0, n
        self.target_counts = np.full(n, 2, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: np.ndarray) -> dict:
        return {"input_ids": np.repeat(np.asarray(idx)[:, None] + 1, self.width, axis=1), "length": np.full(len(idx), self.width)}


def taken(data: TrainData, step: int) -> list[int]:
    return sorted(int(i) - 1 for mb in data.window(step).micro_batches for i in mb.input_ids[:, 0] if i > 0)


@pytest.fixture
def small_array_limit(monkeypatch):
    monkeypatch.setattr(launcher.batches, "ARRAY_ORDER_MAX", 100)


def test_above_the_array_limit_every_epoch_takes_each_row_once_whatever_the_split(small_array_limit, monkeypatch):
    import launcher.data.store

    monkeypatch.setattr(launcher.data.store, "row_store", lambda blocks, pad_id: blocks)
    n = 1001
    layouts = {"2x2": BatchLayout(4, 2, 2), "1x4": BatchLayout(4, 4, 1)}
    ranks = {name: [TrainData(Rows(n), plan, r, 5, True, False) for r in range(plan.world_size)] for name, plan in layouts.items()}
    assert {d.sample_order for data in ranks.values() for d in data} == {"keyed"}
    steps = ranks["2x2"][0].steps_per_epoch
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            windows = {name: sorted(i for d in data for i in taken(d, step)) for name, data in ranks.items()}
            assert windows["2x2"] == windows["1x4"], step  # the same samples however the global batch is split
            seen += windows["2x2"]
        assert sorted(seen) == list(range(n)), epoch
    assert TrainData(Rows(100), layouts["2x2"], 0, 5, True, False).sample_order == "array"


def test_a_resume_orders_as_its_checkpoint_recorded(tmp_path: Path):
    """A run records its order; resumed from a checkpoint that says `keyed` (a large corpus's), the steps after it take
    other samples than the straight run's and the new checkpoint says `keyed` too; one from before the order was
    recorded resumes with the array order, exactly as the straight run."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 4, "micro_batch_size": 2}, checkpoint={"every_steps": 2}))
    straight = tmp_path / "straight"
    check(run_cli("train", str(config), f"output_dir={straight}"))
    state = json.loads((straight / "checkpoints" / "step-000000002" / "trainer_state.json").read_text())
    assert state["sample_order"] == "array"
    losses = {}
    for recorded in ("keyed", None):
        copy = tmp_path / f"recorded-{recorded}"
        shutil.copytree(straight / "checkpoints" / "step-000000002", copy)
        edited = {k: v for k, v in state.items() if k != "sample_order"} | ({"sample_order": recorded} if recorded else {})
        (copy / "trainer_state.json").write_text(json.dumps(edited))
        out = tmp_path / f"resumed-{recorded}"
        check(run_cli("train", str(config), f"output_dir={out}", f"resume={copy}"))
        losses[recorded] = [r["loss"] for r in metrics(out) if "loss" in r]
        last = json.loads((out / "checkpoints" / "step-000000004" / "trainer_state.json").read_text())
        assert last["sample_order"] == (recorded or "array")
    unknown = tmp_path / "recorded-zigzag"  # a checkpoint of a launcher that knows other orders: one line, exit 2
    shutil.copytree(straight / "checkpoints" / "step-000000002", unknown)
    (unknown / "trainer_state.json").write_text(json.dumps(state | {"sample_order": "zigzag"}))
    refused = run_cli("train", str(config), f"output_dir={tmp_path / 'refused'}", f"resume={unknown}")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"launcher: error: resume: checkpoint '{unknown}' orders its samples as 'zigzag', which this launcher does not know;"
        " resume it with the launcher version that wrote it"
    ], refused.stderr
    want = [r["loss"] for r in metrics(straight) if "loss" in r][2:]
    assert losses[None] == want
    assert losses["keyed"] != want
    for key, tensor in final_weights(straight).items():
        assert (final_weights(tmp_path / "resumed-None")[key] == tensor).all(), key
