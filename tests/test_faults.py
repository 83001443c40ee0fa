"""Faults of the machine end cleanly (one line, exit 74, the newest complete checkpoint kept and resumable), and
one run holds an output_dir at a time. The file-system tests mount small tmpfs folders (they need root)."""

import json
import os
import shutil
import signal
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from launcher.checkpoints import complete_checkpoints, verify_checkpoint

from conftest import check, final_weights, metrics, run_cli, tiny_config, train_until_rows, write_config

EXIT_FAULT = 74


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path`, unmounted afterwards (also when the test fails)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error_line(proc, code: int) -> str:
    """The one error line (besides it, stderr holds only the progress bar)."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if "launcher:" in line]
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_full_disk_ends_cleanly_and_the_run_resumes_bitwise_once_space_is_freed(tmp_path: Path, nproc: int):
    """A 2 MB tmpfs as output_dir, a checkpoint every step (about 0.5 MB each): the disk fills within a few steps."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path, model={"dropout": 0.1}, train={"max_steps": 8}, checkpoint={"every_steps": 1}, launch={"nproc_per_node": nproc}),
    )
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'straight'}"))
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        line = one_error_line(run_cli("train", str(config), f"output_dir={out}"), EXIT_FAULT)
        assert "no space left on the device" in line and f"'{out}'" in line and "resume=auto" in line, line
        newest = complete_checkpoints(out)[-1]
        verify_checkpoint(newest)  # complete: every file there at its size
        assert not any(p.name.startswith(".partial-") for p in (out / "checkpoints").iterdir())
        assert not (out / "final").exists() and not (out / "run.lock").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space is freed
        proc = check(run_cli("train", str(config), f"output_dir={out}", "resume=auto"))
        assert f"resumed from {newest} at step {int(newest.name[5:])}" in proc.stdout
        weights, reference = final_weights(out), final_weights(tmp_path / "straight")
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), name
        assert [r["loss"] for r in metrics(out) if "loss" in r] == [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r]


def test_read_only_output_dir_and_cache_and_too_little_space_are_refused_before_the_model_is_built(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro, tmpfs(tmp_path / "small", "64k") as small:
        cases = [
            (f"output_dir={ro / 'out'}", f"output_dir: '{ro / 'out'}' cannot be written (read-only file system at '{ro}')"),
            (f"data.cache_dir={ro / 'cache'}", f"data.cache_dir: '{ro / 'cache'}' cannot be written (read-only file system"),
            # 42,752 parameters x (4 bytes of weights + 8 of AdamW moments); the run's lock holds out/ and a page of the 64 KB
            (f"output_dir={small / 'out'}", f"a checkpoint of this run needs about 513.0 KB and '{small / 'out'}' has 61.4 KB free"),
        ]
        for i, (override, expected) in enumerate(cases):
            nproc = 2 if i == 0 else 1  # a plain multi-process run finds it before starting its processes
            proc = run_cli("train", str(config), override, f"launch.nproc_per_node={nproc}")
            assert expected in one_error_line(proc, EXIT_FAULT)
            assert "total" not in proc.stdout  # the parameter table, printed once the model is built
        assert list(small.iterdir()) == []


def test_a_vanished_output_dir_ends_the_run_without_recreating_it(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 100000, "log_every": 1}, checkpoint={"every_steps": 5}))
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 2)
    # deleted at once: `rm -r` on the path itself races the run's own writes and its lock's removal at exit
    out.rename(tmp_path / "deleted")
    shutil.rmtree(tmp_path / "deleted")
    stdout, stderr = proc.communicate(timeout=120)
    proc.stdout, proc.stderr = stdout, stderr
    line = one_error_line(proc, EXIT_FAULT)
    assert f"output_dir '{out}' vanished" in line
    assert not out.exists()


def test_a_second_run_on_a_held_output_dir_is_refused_and_the_first_finishes_unharmed(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 100000, "log_every": 1}, checkpoint={"every_steps": 1000}))
    out = tmp_path / "out"
    first = train_until_rows(config, out, 3)
    holder = json.loads((out / "run.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == first.pid
    for flags in (["--overwrite"], ["resume=auto", "launch.nproc_per_node=2"]):
        line = one_error_line(run_cli("train", str(config), *flags), 2)
        assert f"output_dir: '{out}' is in use by a run on {socket.gethostname()} (pid {first.pid}" in line, line
    first.send_signal(signal.SIGTERM)  # the first run ends as it would have: a checkpoint, exit 75
    first.communicate(timeout=300)
    assert first.returncode == 75
    stopped = json.loads((out / "preempted.json").read_text())["step"]
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, stopped + 1))
    assert not (out / "run.lock").exists()
    check(run_cli("train", str(config), "resume=auto", f"train.max_steps={stopped + 1}"))  # and finishes

    # a lock left by a killed run on this host is taken over, with a warning
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": "1"}) + "\n")
    proc = check(run_cli("train", str(config), "resume=auto", f"train.max_steps={stopped + 2}"))
    assert f"launcher: warning: took over the lock of a run on {socket.gethostname()} (pid {dead.pid}" in proc.stderr
    assert not (out / "run.lock").exists()
