"""Non-finite diagnosis (stop and skip, 2 gloo ranks), per-layer gradient norms and --dump-grad against a
hand-written loop, and TensorBoard event files read back with tensorboard's own reader."""

import json
import math
from pathlib import Path

import pytest
import torch

from launcher.build import build_run
from launcher.config import load_config
from launcher.diagnostics import layer_of
from launcher.exits import EXIT_NONFINITE
from launcher.loop import train

from conftest import check, final_weights, metrics, reference_training, run_cli, tiny_config, write_config

PLANTED = "blocks.1.mlp_in.weight"


def nan_config(tmp_path: Path, rank: int, step: int, **sections) -> Path:
    """Two gloo processes started by a plain `launcher train`; rank `rank` plants a nan gradient in step `step`."""
    config = tiny_config(tmp_path, launch={"nproc_per_node": 2}, **sections)
    config["model"] = {"factory": "factories:nan_gradient_gpt", "factory_kwargs": {"param": PLANTED, "rank": rank, "step": step, "accumulation": 2}}
    return write_config(tmp_path / "c.yaml", config)


def run_tests_cli(*args: str):
    """The launcher as a plain process that starts its own workers, with tests/ importable (model factories)."""
    import os
    import subprocess

    from conftest import PYTHON, REPO, cpu_env, no_teardown_with_groups

    env = cpu_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    return no_teardown_with_groups(subprocess.run([PYTHON, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300))


def test_a_planted_nan_stops_the_run_naming_step_rank_and_parameter(tmp_path: Path):
    """The nan appears at step 5, between checks (log every 3, checkpoints every 2): the step-6 check reports
    step 5, rank 1 and the parameter; step 6 is not checkpointed, step 4 stays the newest checkpoint."""
    config = nan_config(tmp_path, rank=1, step=5, train={"max_steps": 8, "log_every": 3}, checkpoint={"every_steps": 2})
    proc = run_tests_cli("train", str(config))
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("launcher: error: ")]
    assert errors[0] == "launcher: error: non-finite loss or gradient at step 5; stopping (diagnostics.nonfinite: stop)", errors
    rank0 = next(line for line in errors if "rank 0:" in line)
    rank1 = next(line for line in errors if "rank 1:" in line)
    after = next(line for line in errors if "after the all-reduce" in line)
    assert "gradients before the all-reduce finite" in rank0, rank0
    assert f"gradients before the all-reduce non-finite in 1 of 27 parameters: {PLANTED} (norm nan)" in rank1, rank1
    assert f"after the all-reduce: gradients non-finite in 1 of 27 parameters: {PLANTED} (norm nan)" in after, after
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000002", "step-000000004"]
    assert not (out / "final").exists()
    assert json.loads((out / "nonfinite.json").read_text())["report"][0].startswith("non-finite loss or gradient at step 5")
    losses = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert math.isfinite(losses[3]) and losses[6] == "nan"  # the step-6 row covers steps 4-6


def test_skip_drops_the_bad_step_counts_it_and_holds_the_schedule(tmp_path: Path):
    config = nan_config(tmp_path, rank=1, step=3, train={"max_steps": 5, "log_every": 1, "warmup_steps": 0}, diagnostics={"nonfinite": "skip"})
    proc = check(run_tests_cli("train", str(config)))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("launcher: warning: ")]
    assert warnings[0] == "launcher: warning: non-finite loss or gradient at step 3; step skipped (diagnostics.nonfinite: skip)"
    assert any("rank 1:" in w and PLANTED in w for w in warnings), warnings
    assert "1 step(s) dropped for an inf/nan loss or gradient" in proc.stdout
    rows = {r["step"]: r for r in metrics(tmp_path / "out") if "loss" in r}
    assert [rows[s]["nonfinite_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert rows[4]["lr"] == rows[3]["lr"] != rows[2]["lr"], "the schedule does not advance on a dropped step"
    assert rows[3]["loss"] == "nan"  # no applied step in that row's interval
    assert all(math.isfinite(float(rows[s]["loss"])) for s in (1, 2, 4, 5)), rows
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "out").values())


def test_gradient_statistics_and_layer_norms_equal_a_hand_written_loop(tmp_path: Path, fresh_accelerate, capsys):
    """--dump-grad's numbers and the per-layer norms are the pre-clip gradients of the step (clipping active)."""
    name = "blocks.0.qkv.weight"
    config = load_config(
        write_config(
            tmp_path / "c.yaml",
            tiny_config(
                tmp_path,
                train={"max_steps": 3, "max_grad_norm": 0.3, "gradient_accumulation_steps": 2},
                diagnostics={"dump_grad": [name], "dump_grad_steps": [2, 3], "grad_norms_every": 1},
            ),
        )
    )
    run = build_run(config, overwrite=True)
    windows = [run.train_data.window(step) for step in range(run.total_steps)]
    train(run)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grad ")]
    assert [line.split(" at step ")[1].split()[0] for line in printed] == ["2", "3"]
    assert printed[0].startswith(f"grad {name} [96x32] at step 2 (pre-clip): norm ")

    rows = metrics(run.cfg.output_dir)
    checked_steps = []

    def check_pre_clip_gradients(step: int, model) -> None:
        checked_steps.append(step)
        by_layer: dict[str, float] = {}
        for pname, param in model.named_parameters():
            if param.grad is not None:
                by_layer[layer_of(pname)] = by_layer.get(layer_of(pname), 0.0) + param.grad.norm().item() ** 2
        logged = next(r["grad_norm_by_layer"] for r in rows if r["step"] == step and "grad_norm_by_layer" in r)
        assert logged.keys() == by_layer.keys()
        for layer, squared in by_layer.items():
            assert abs(logged[layer] - math.sqrt(squared)) <= 1e-5 * math.sqrt(squared), (step, layer)
        grad = dict(model.named_parameters())[name].grad
        dumped = [r["grad"][name] for r in rows if r["step"] == step and "grad" in r]
        if step in (2, 3):
            stats = dumped[0]
            assert abs(stats["norm"] - grad.norm().item()) <= 1e-5 * grad.norm().item()
            assert abs(stats["max"] - grad.max().item()) <= 1e-6 and abs(stats["std"] - grad.std().item()) <= 1e-6
            assert stats["nonfinite"] == 0 and 0 <= stats["zero_fraction"] < 1
        else:
            assert dumped == []

    reference_training(run.cfg, windows, max_grad_norm=0.3, inspect_gradients=check_pre_clip_gradients)
    assert checked_steps == [1, 2, 3]


@pytest.mark.parametrize("spelling", [{"tensorboard": True}, {"trackers": ["tensorboard"]}], ids=["train.tensorboard", "train.trackers"])
def test_tensorboard_event_files_hold_the_metrics(tmp_path: Path, spelling: dict):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            train={"max_steps": 4, "log_every": 2, **spelling},
            eval={"at_start": True, "every_steps": 2},
            diagnostics={"grad_norms_every": 2},
        ),
    )
    check(run_cli("train", str(config)))
    out = tmp_path / "out"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = metrics(out)
    for tag, key in (("loss", "loss"), ("lr", "lr"), ("grad_norm", "grad_norm"), ("eval_loss", "eval_loss"), ("tokens_per_s", "tokens_per_s")):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged], tag
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(read, logged)), tag
    assert [e.step for e in events.Scalars("grad_norm_by_layer/blocks.0")] == [2, 4]


def test_deepspeed_stop_names_the_step_and_the_rank_losses(tmp_path: Path):
    """Under ZeRO-2 the engine's global norm shows the nan; the gradients are partitioned, so the report says so."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    from conftest import REPO

    config = nan_config(
        tmp_path, rank=1, step=3, train={"max_steps": 5, "log_every": 1}, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")
    )
    proc = run_tests_cli("train", str(config))
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2: global batch 8" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("launcher: error: ")]
    assert errors[0] == "launcher: error: non-finite loss or gradient at step 3; stopping (diagnostics.nonfinite: stop)", errors
    assert all("gradient names are not available under DeepSpeed" in line for line in errors[1:3]), errors
    assert not (tmp_path / "out" / "final").exists()
