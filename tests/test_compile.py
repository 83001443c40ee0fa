"""The launcher's compiled step: the model forward is one graph (no graph break) and nothing recompiles after
the first training step and the first evaluation, across log steps, evaluations and an epoch boundary."""

from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from launcher.build import build_run
from launcher.config import load_config
from launcher.loop import train

from conftest import metrics, tiny_config, write_config


def test_compiled_bf16_run_has_no_graph_break_and_no_recompilation(tmp_path: Path, fresh_accelerate):
    """bf16, so that Accelerate's autocast and fp32-output wrappers around the forward are inside the compiled
    region too. The tiny corpus has 25 steps per epoch; 30 steps cross into the second epoch, whose last
    window is partial in the first (short micro-batches are padded to the same shape)."""
    config = tiny_config(
        tmp_path, train={"compile": True, "mixed_precision": "bf16", "max_steps": 30, "log_every": 5}, eval={"every_steps": 10, "at_start": True}
    )
    run = build_run(load_config(write_config(tmp_path / "c.yaml", config)), overwrite=True)
    assert run.train_data.steps_per_epoch < 30
    torch._dynamo.reset()
    counters.clear()
    train(run)

    assert dict(counters["graph_break"]) == {}
    # one graph for training and one for evaluation (no_grad is part of a graph's guards); none later
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])
    rows = metrics(run.cfg.output_dir)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 10, 20, 30]
    assert len([r for r in rows if "loss" in r]) == 6
