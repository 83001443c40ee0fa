"""A checkpoint's files carry their CRC-32 in trainer_state.json: random bytes written into one at the same size are
found by the resume's pre-flight (or, under a launcher, by the main process under the lock), refused in one line
naming the file and the earlier checkpoint to resume from, exit 2, nothing on disk changed."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pytest

from conftest import check, disk_snapshot, run_cli, tiny_config, write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 1-process run with checkpoints at steps 2 and 4, and a 2-process one with a checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("checksums")
    config = write_config(tmp / "c.yaml", tiny_config(tmp, train={"max_steps": 4}, checkpoint={"every_steps": 2}))
    check(run_cli("train", str(config), f"output_dir={tmp / 'one'}"))
    check(run_cli("train", str(config), f"output_dir={tmp / 'two'}", "train.max_steps=2", "launch.nproc_per_node=2"))
    return {"config": config, "one": tmp / "one", "two": tmp / "two"}


def corrupted_copy(run: Path, to: Path, step: int, name: str) -> Path:
    """A copy of `run` with 64 random bytes written into the middle of a file of its step-`step` checkpoint (size kept)."""
    shutil.copytree(run, to)
    target = to / "checkpoints" / f"step-{step:09d}" / name
    size, before = target.stat().st_size, target.read_bytes()
    with open(target, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(64))
    assert target.stat().st_size == size and target.read_bytes() != before
    return target


def test_every_file_of_a_checkpoint_is_listed_with_its_crc32(runs):
    for run, step in ((runs["one"], 4), (runs["two"], 2)):
        folder = run / "checkpoints" / f"step-{step:09d}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert (
            sorted(state["crc32"])
            == sorted(state["files"])
            == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "trainer_state.json")
        )
        assert state["crc32"] == {name: f"{zlib.crc32((folder / name).read_bytes()):08x}" for name in state["files"]}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(
        json.loads((runs["two"] / "checkpoints" / "step-000000002" / "trainer_state.json").read_text())["crc32"]
    )


@pytest.mark.parametrize("name", ["model.safetensors", "random_states_0.pkl"])
def test_random_bytes_in_a_checkpoint_are_refused_at_resume_naming_the_file_and_the_earlier_checkpoint(runs, tmp_path: Path, name: str):
    out = tmp_path / "out"
    target = corrupted_copy(runs["one"], out, 4, name)
    state = json.loads((target.parent / "trainer_state.json").read_text())
    before = disk_snapshot(out, folders=True)
    proc = run_cli("train", str(runs["config"]), f"output_dir={out}", "resume=auto", "train.max_steps=6")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"launcher: error: resume: checkpoint '{target.parent}' is corrupt: {name} has other bytes than were written"
        f" (CRC-32 {zlib.crc32(target.read_bytes()):08x}, written {state['crc32'][name]}; same size);"
        f" resume from an earlier checkpoint (resume={out / 'checkpoints' / 'step-000000002'})"
    ]
    assert disk_snapshot(out, folders=True) == before


def test_a_corrupt_rank_1_rng_state_is_refused_by_the_main_process_under_torchrun(runs, tmp_path: Path):
    out = tmp_path / "out"
    target = corrupted_copy(runs["two"], out, 2, "random_states_1.pkl")
    state = json.loads((target.parent / "trainer_state.json").read_text())
    before = disk_snapshot(out, folders=True)
    proc = run_cli("train", str(runs["config"]), f"output_dir={out}", "resume=auto", nproc=2)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("launcher:")]
    assert lines == [
        f"launcher: error: resume: checkpoint '{target.parent}' is corrupt: random_states_1.pkl has other bytes than were written"
        f" (CRC-32 {zlib.crc32(target.read_bytes()):08x}, written {state['crc32']['random_states_1.pkl']}; same size);"
        f" restore the file from a copy, or train anew with output_dir=NEW_DIR"
    ], proc.stderr[-3000:]
    assert "total" not in proc.stdout  # refused before the parameter table: the lock and the plan come first
    assert disk_snapshot(out, folders=True) == before
