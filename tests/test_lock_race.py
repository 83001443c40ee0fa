"""Runs started together on one output_dir: the pre-flight takes `run.lock` before anything touches output_dir and
decides where the run starts under it, so exactly one run trains and the other is refused in one line (exit 2),
and the trained folder holds that run's files only."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, REPO, check, cpu_env, disk_snapshot, no_teardown_with_groups, tiny_config, wait_for_rows, write_config

TIMESTAMPS = ("tokens_per_s", "s_per_step")  # the only bytes of a run that depend on the clock


def start(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "launcher", "train", str(config), *overrides],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return no_teardown_with_groups(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def run_files(out: Path) -> dict[str, str]:
    """disk_snapshot of a run's folder, metrics.jsonl compared without its clock readings."""
    files = disk_snapshot(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    files["metrics.jsonl"] = json.dumps([{k: v for k, v in row.items() if k not in TIMESTAMPS} for row in rows])
    return files


def holder(out: Path, timeout_s: float = 120) -> dict:
    """The lock's record, as soon as there is one (polled: the file is created, then written)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return json.loads((out / "run.lock").read_text())
        except (OSError, ValueError):
            time.sleep(0.002)
    raise AssertionError(f"no {out / 'run.lock'} after {timeout_s:g} s")


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_two_runs_started_together_ten_times_one_trains_and_its_files_are_its_own(tmp_path: Path):
    # the two runs differ (their seeds), so a folder holding files of both would not match either run alone
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 1}))
    out = tmp_path / "out"
    seeds = ("seed=1", "seed=2")
    alone = {}
    for seed in seeds:  # each run alone, into the same output_dir (config.yaml records it)
        check(finish(start(config, seed)))
        alone[seed] = run_files(out)
        shutil.rmtree(out)
    assert alone["seed=1"]["checkpoints/step-000000002/model.safetensors"] != alone["seed=2"]["checkpoints/step-000000002/model.safetensors"]
    assert "run.lock" not in alone["seed=1"]

    for _ in range(10):
        procs = [start(config, seed) for seed in seeds]
        results = [finish(p) for p in procs]
        assert sorted(r.returncode for r in results) == [0, 2], [(r.returncode, r.stderr[-2000:]) for r in results]
        winner = 0 if results[0].returncode == 0 else 1
        refused = results[1 - winner]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "total" not in refused.stdout, refused.stderr  # refused before the model was built
        # in use by the winner, or (had the winner ended before the loser's pre-flight) its finished files seen
        in_use = f"launcher: error: output_dir: '{out}' is in use by a run on {socket.gethostname()} (pid {procs[winner].pid}, since "
        not_empty = f"launcher: error: output_dir: '{out}' already exists and is not empty; pass --overwrite"
        assert lines[0].startswith((in_use, not_empty)), lines[0]
        assert run_files(out) == alone[seeds[winner]]
        shutil.rmtree(out)


def test_a_two_process_run_holds_the_lock_from_its_pre_flight_on(tmp_path: Path):
    """A plain `launcher train` with 2 processes locks output_dir in its pre-flight, before torchrun starts the workers,
    and hands the lock to the workers' main process: there is no moment without a holder for a second run to use."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 60}, launch={"nproc_per_node": 2}))
    out = tmp_path / "out"
    first = start(config)
    taken = holder(out)
    assert taken["pid"] == first.pid and taken["host"] == socket.gethostname()  # the pre-flight's process
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # before any other write
    second = finish(start(config, "launch.nproc_per_node=1"))
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"output_dir: '{out}' is in use by a run on {socket.gethostname()} (pid " in second.stderr
    wait_for_rows(out, 1, lambda: first.poll() is None)  # 59 steps are left: the lock is still held when it is read
    worker = holder(out)["pid"]
    assert parent_pid(parent_pid(worker)) == first.pid  # handed over: rank 0, a child of torchrun, a child of the first
    result = check(finish(first))
    assert "eval loss" in result.stdout
    assert not (out / "run.lock").exists() and (out / "final" / "model.safetensors").is_file()
