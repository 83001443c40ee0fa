"""Ctrl-C on a plain `launcher train`, one and two processes: the first stops at a step boundary after a checkpoint
(exit 75), a second stops at once (exit 130); no traceback from any process either way."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from launcher.checkpoints import complete_checkpoints, verify_checkpoint

from conftest import check, run_cli, tiny_config, train_until_rows, write_config


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_once_checkpoints_and_exits_75_and_twice_stops_at_once(tmp_path: Path, nproc: int):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 100000, "log_every": 1}, checkpoint={"every_steps": 3}))
    out = tmp_path / "out"

    # as from a terminal: the command leads its own process group, which Ctrl-C signals as a whole
    once = train_until_rows(config, out, 4, f"launch.nproc_per_node={nproc}", timeout_s=180, new_session=True)
    os.killpg(once.pid, signal.SIGINT)
    stdout, stderr = once.communicate(timeout=180)
    assert once.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "Error" not in stderr.replace("launcher: error", ""), stderr[-3000:]
    assert stderr.count("launcher: interrupted: stopping after this step with a checkpoint") == 1
    marker = json.loads((out / "preempted.json").read_text())
    assert Path(marker["checkpoint"]) == complete_checkpoints(out)[-1]
    verify_checkpoint(Path(marker["checkpoint"]))
    assert not (out / "run.lock").exists()

    twice = train_until_rows(config, out, marker["step"] + 3, f"launch.nproc_per_node={nproc}", "resume=auto", timeout_s=180, new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(twice.stderr), daemon=True)
    reader.start()
    os.killpg(twice.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while not any("launcher: interrupted:" in line for line in lines):  # a person presses again after seeing it
        assert time.monotonic() < deadline and twice.poll() is None, "".join(lines)
        time.sleep(0.001)
    os.killpg(twice.pid, signal.SIGINT)
    stdout = twice.stdout.read()
    twice.wait(timeout=60)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert twice.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert "launcher: interrupted twice: stopped at once, without a checkpoint" in stderr
    deadline = time.monotonic() + 30  # the workers die with torchrun (their parent-death signal)
    while subprocess.run(["pgrep", "-f", str(config)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the run outlived the second Ctrl-C"
        time.sleep(0.1)
    newest = complete_checkpoints(out)[-1]
    verify_checkpoint(newest)  # still complete: resumable
    proc = check(run_cli("train", str(config), "resume=auto", f"train.max_steps={int(newest.name[5:]) + 1}", f"launch.nproc_per_node={nproc}"))
    assert f"resumed from {newest}" in proc.stdout
