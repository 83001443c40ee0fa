"""Checkpoints and exact resume: a run stopped by a signal at any step and resumed ends bitwise identical to the
uninterrupted run (fp32, CPU, same world size; DDP, DeepSpeed ZeRO-2 and FSDP2), with dropout on so that the restored
RNG states matter."""

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    check,
    cpu_env,
    disk_snapshot,
    final_weights,
    metrics,
    run_cli,
    tiny_config,
    torchrun,
    train_until_rows,
    write_config,
)

EXIT_PREEMPTED = 75
STEPS, ACCUMULATION = 10, 2


def resume_config(tmp_path: Path, **train) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            model={"dropout": 0.1},
            freeze=["pos_embed.*"],
            eval={"every_steps": 4},
            train={"max_steps": STEPS, "gradient_accumulation_steps": ACCUMULATION, "micro_batch_size": 4, "log_every": 1, **train},
            checkpoint={"every_steps": 3, "keep_last": 2},
        ),
    )


def run_with_signal(config: Path, micro_step: int, nproc: int, *overrides: str, second_signal: bool = False) -> subprocess.CompletedProcess:
    cmd = torchrun(nproc, str(REPO / "tests" / "workers" / "train_with_signal.py"), str(config), str(micro_step), *overrides)
    env = cpu_env(PYTHONPATH=str(REPO), SECOND_SIGNAL_DURING_SAVE="1" if second_signal else "0")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


SCENARIOS = {  # name: (processes, extra overrides, rank-0 micro-steps at which SIGUSR1 arrives)
    "1 rank DDP": (1, [], [3]),  # the 4th micro-step: the last of step 2, so it stops after step 2
    "2 ranks DDP": (2, [], [2, 13]),  # first micro-step of step 2 (mid-window); step 7, the end of epoch 0
    "2 ranks ZeRO-2": (2, ["deepspeed=configs/deepspeed/zero2.json"], [4]),
    "2 ranks FSDP2": (2, ["fsdp={}"], [2]),  # Distributed Checkpoint shards; mid-window
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path: Path, name: str):
    nproc, overrides, signal_points = SCENARIOS[name]
    if any(o.startswith("deepspeed=") for o in overrides):
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    config = resume_config(tmp_path)
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'straight'}", *overrides, nproc=nproc))
    reference = final_weights(tmp_path / "straight")
    reference_rows = [r for r in metrics(tmp_path / "straight") if "loss" in r]

    for micro_step in signal_points:
        out = tmp_path / f"stopped-at-{micro_step}"
        # the 1-rank run also gets a SIGTERM in the middle of its checkpoint save: nothing changes
        stopped = run_with_signal(config, micro_step, nproc, f"output_dir={out}", *overrides, second_signal=nproc == 1)
        assert stopped.returncode != 0, stopped.stdout[-2000:]
        marker = json.loads((out / "preempted.json").read_text())
        stop_step = micro_step // ACCUMULATION + 1  # the step during which the signal arrived completes first
        assert marker["step"] == stop_step and Path(marker["checkpoint"]).is_dir(), marker
        state = json.loads((Path(marker["checkpoint"]) / "trainer_state.json").read_text())
        steps_per_epoch = int(re.search(r"(\d+) steps per epoch", stopped.stdout).group(1))
        assert state["step"] == stop_step and state["epoch"] == stop_step // steps_per_epoch
        assert (Path(marker["checkpoint"]) / "config.yaml").is_file()
        assert not (out / "final").exists()

        resumed = check(run_cli("train", str(config), f"output_dir={out}", "resume=auto", *overrides, nproc=nproc))
        assert f"resumed from {marker['checkpoint']} at step {stop_step}" in resumed.stdout
        assert not (out / "preempted.json").exists()
        weights = final_weights(out)
        for key, tensor in reference.items():
            assert torch.equal(weights[key], tensor), f"{name}, signal at micro-step {micro_step}: {key} differs"
        rows = [r for r in metrics(out) if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in rows] == [r["loss"] for r in reference_rows]
        kept = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert kept == ["step-000000009", "step-000000010"], kept  # keep_last 2: every 3 steps and at the end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("finished")
    config = resume_config(tmp_path, max_steps=3)
    check(run_cli("train", str(config)))
    return config, tmp_path / "out"


BAD_RESUMES = {  # name: (how to break it, overrides, expected text in the one line)
    "missing path": (None, ["resume=/no/such/checkpoint"], "resume: checkpoint '/no/such/checkpoint' does not exist"),
    "truncated weights": ("truncate", [], "cannot be loaded"),
    "no trainer state": ("no-state", [], "is not a complete checkpoint"),
    "other model shape": (None, ["model.d_model=64", "resume_allow_changes=[model.d_model]"], "was written by a model of a different shape"),
    "changed config": (None, ["model.d_model=64"], "the config differs from checkpoint"),
    "other global batch": (None, ["train.micro_batch_size=2"], "global batch of 8, this run has 4"),
}


@pytest.mark.parametrize("name", BAD_RESUMES)
def test_a_checkpoint_that_cannot_be_resumed_is_refused_and_kept(tmp_path: Path, finished_run, name: str):
    config, out = finished_run
    breakage, overrides, expected = BAD_RESUMES[name]
    checkpoint = tmp_path / "copy"
    shutil.copytree(out / "checkpoints" / "step-000000003", checkpoint)
    if breakage == "truncate":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "no-state":
        (checkpoint / "trainer_state.json").unlink()
    resume = [] if any(o.startswith("resume=") for o in overrides) else [f"resume={checkpoint}"]
    before, before_out = disk_snapshot(tmp_path), disk_snapshot(out)
    # into a new output_dir: a non-empty one is refused for resuming another run's checkpoint (the resume contract)
    proc = run_cli("train", str(config), f"output_dir={tmp_path / 'elsewhere'}", *resume, *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: resume: ") and expected in lines[0], lines
    assert disk_snapshot(tmp_path) == before and disk_snapshot(out) == before_out  # nothing deleted or rewritten


def test_resume_on_another_world_size_with_the_same_global_batch(tmp_path: Path):
    """2 ranks x 2 micro-steps, stopped after step 3, resumed on 1 rank x 4 micro-steps: the same samples per step,
    so the run ends where the uninterrupted 2-rank run ends (to 1e-5: summation order differs; dropout off)."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path, train={"max_steps": 6, "gradient_accumulation_steps": 2, "micro_batch_size": 4}, checkpoint={"every_steps": 3}),
    )
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'straight'}", nproc=2))
    stopped = run_with_signal(config, 5, 2, f"output_dir={tmp_path / 'moved'}")  # the last micro-step of step 3
    assert stopped.returncode != 0 and json.loads((tmp_path / "moved" / "preempted.json").read_text())["step"] == 3
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'moved'}", "resume=auto", "train.gradient_accumulation_steps=4"))
    straight, moved = final_weights(tmp_path / "straight"), final_weights(tmp_path / "moved")
    for name, tensor in straight.items():
        torch.testing.assert_close(moved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_signal_to_a_plain_multi_process_run_checkpoints_and_exits_75(tmp_path: Path):
    """`launcher train` with launch.nproc_per_node=2 starts torchrun itself; SIGUSR1 to it reaches the workers,
    which stop after a checkpoint; the command exits with 75, and resume=auto finishes the run."""
    config = resume_config(tmp_path, max_steps=100000, log_every=1)
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 3, "launch.nproc_per_node=2", merge_stderr=True)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    assert Path(marker["checkpoint"]).is_dir() and marker["step"] >= 3
    assert marker["requeue"] is True  # the workers got the requeue signal itself, not SIGTERM
