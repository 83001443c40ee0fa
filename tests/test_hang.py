"""The hang report, the set-up wait and the straggler report (launcher.hang, launcher.setup_wait,
launcher.stragglers), on real multi-process gloo runs of a plain `launcher train` on CPU.

Collective numbers in the reports are counted from the start of training: #1 is DDP's bucket-settling backward
before the first step; step 1 then starts the stop agreement's all-reduce #2 as it begins (launcher.agreement: it
overlaps the step), runs its DDP gradient all-reduce #3 (the model fits one bucket) and its checkpoint's six (#4-#9:
four stage agreements, Accelerate's barrier in save_state, the checksum gather); step 2 starts its agreement #10 and
runs its gradient all-reduce #11. train.log_every=100 keeps the log steps' collectives out of the first steps."""

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, check, cpu_env, metrics, no_teardown_with_groups, tiny_config, train_until_rows, write_config

EXIT_HUNG = 77
HOST = socket.gethostname()
HANG_REPORT_S, TIMEOUT_S = 3, 20


def line_of(path: str, text: str) -> int:
    [number] = [i for i, line in enumerate((REPO / path).read_text().splitlines(), start=1) if text in line]
    return number


SLEEP_LINE = f"tests/factories.py:{line_of('tests/factories.py', 'time.sleep(self.seconds)')}"
BACKWARD_LINE = f"launcher/loop.py:{line_of('launcher/loop.py', 'acc.backward(loss_sum * scale)')}"


def hang_config(tmp_path: Path, model: dict, **sections) -> Path:
    config = tiny_config(
        tmp_path,
        distributed={"timeout_s": TIMEOUT_S, "hang_report_s": HANG_REPORT_S},
        train={"max_steps": 6, "log_every": 100},
        checkpoint={"every_steps": 1},
        model={**model, "factory_kwargs": {**model["factory_kwargs"], "n_layer": 2, "n_head": 2, "d_model": 32}},
        **sections,
    )
    return write_config(tmp_path / "c.yaml", config)


def train(config: Path, nproc: int, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "launcher", "train", str(config), f"launch.nproc_per_node={nproc}", *overrides]
    env = cpu_env(PYTHONPATH=str(REPO / "tests"))
    return no_teardown_with_groups(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout))


def launcher_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("launcher:")]


def hung_run(tmp_path: Path, nproc: int, rank: int) -> dict:
    """Rank `rank` sleeps 30 minutes in step 2's second micro-batch forward (the model's output check and DDP's
    bucket settling make the first two forwards), once: the resumed run continues from step 1's checkpoint."""
    once = tmp_path / "hung-once"
    model = {"factory": "factories:hanging_gpt", "factory_kwargs": {"rank": rank, "forward": 5, "seconds": 1800, "once": str(once)}}
    config = hang_config(tmp_path, model)
    proc = train(config, nproc)
    out = tmp_path / "out"
    report = json.loads((out / "hang.json").read_text())
    resumed = train(config, nproc, "resume=auto")
    return {"proc": proc, "out": out, "report": report, "slept_from": float(once.read_text().split()[1]), "resumed": resumed}


@pytest.fixture(scope="module")
def hung2(tmp_path_factory) -> dict:
    return hung_run(tmp_path_factory.mktemp("hung2"), 2, rank=1)


@pytest.fixture(scope="module")
def hung4(tmp_path_factory) -> dict:
    return hung_run(tmp_path_factory.mktemp("hung4"), 4, rank=2)


@pytest.mark.parametrize("case", ["hung2", "hung4"])
def test_a_rank_asleep_in_forward_is_named_with_its_host_and_line(case: str, request):
    run = request.getfixturevalue(case)
    proc, out, report = run["proc"], run["out"], run["report"]
    assert proc.returncode == EXIT_HUNG, proc.stderr[-6000:]
    sleeper, waiters = (1, "rank 0 waits") if case == "hung2" else (2, "ranks 0-1, 3 wait")
    pid = report["ranks"][str(sleeper)]["pid"]
    line = (
        f"hang at step 2: rank {sleeper} (host {HOST}, pid {pid}) is in forward at {SLEEP_LINE} (time.sleep(self.seconds));"
        f" {waiters} in all-reduce (DDP gradients) #11 at {BACKWARD_LINE}; rank {sleeper} entered #10 only"
    )
    assert report["line"] == line
    assert launcher_lines(proc.stderr) == [
        f"launcher: {line} (every rank's stack: {out}/hang.json; all threads in logs/rank-N.log)",
        f"launcher: error: {line}; the run was ended after distributed.timeout_s = {TIMEOUT_S} s (every rank's stack:"
        f" {out}/hang.json; their output in {out}/logs/); resume=auto continues from the newest complete checkpoint",
    ]
    assert report["time"] - run["slept_from"] <= HANG_REPORT_S + 30
    # every thread's stack, in the sleeper's own log; the waiters' main thread in the report
    assert 'Thread "MainThread"' in (out / "logs" / f"rank-{sleeper}.log").read_text()
    assert any(BACKWARD_LINE in frame for frame in report["ranks"]["0"]["stack"])
    resumed = check(run["resumed"])
    assert [r["step"] for r in metrics(out) if "loss" in r] == [6]
    assert "resumed from " in resumed.stdout and "at step 1" in resumed.stdout
    assert not (out / "hang.json").exists() and launcher_lines(resumed.stderr) == []


def test_a_stopped_rank_is_named_as_not_answering(tmp_path: Path):
    """SIGSTOP on rank 1 mid-run: its heartbeat stops; rank 0, waiting in a collective, reports it."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path, distributed={"timeout_s": TIMEOUT_S, "hang_report_s": HANG_REPORT_S}, train={"max_steps": 100000}),
    )
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 2, "launch.nproc_per_node=2", timeout_s=240)
    pid = json.loads((out / "heartbeats" / "rank-1.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_HUNG, stderr[-6000:]
    report = json.loads((out / "hang.json").read_text())
    assert report["silent"] == [1]
    assert f"rank 1 (host {HOST}, pid {pid}) does not answer (stopped, dead or unreachable; last seen in " in report["line"]
    assert "rank 0 waits in " in report["line"]
    assert report["ranks"]["0"]["stalled"] and any("launcher/loop.py" in frame for frame in report["ranks"]["0"]["stack"])
    assert launcher_lines(stderr)[-1].startswith(f"launcher: error: {report['line']}; the run was ended after distributed.timeout_s")


def test_a_rank_stuck_reading_data_is_named_with_phase_data(tmp_path: Path):
    """Rank 1's data source takes 30 minutes for step 2's batches: rank 0 waits in step 2's all-reduce #11."""
    model = {"factory": "factories:slow_data_gpt", "factory_kwargs": {"rank": 1, "step": 1, "seconds": 1800}}
    proc = train(hang_config(tmp_path, model), 2)
    assert proc.returncode == EXIT_HUNG, proc.stderr[-6000:]
    report = json.loads((tmp_path / "out" / "hang.json").read_text())
    pid = report["ranks"]["1"]["pid"]
    assert report["line"] == (
        f"hang at step 2: rank 1 (host {HOST}, pid {pid}) is in data at tests/factories.py:{line_of('tests/factories.py', 'time.sleep(seconds)')}"
        f" (time.sleep(seconds)); rank 0 waits in all-reduce (DDP gradients) #11 at {BACKWARD_LINE}; rank 1 entered #10 only"
    )


def test_a_long_set_up_on_rank_0_is_no_hang_and_equal_ranks_are_no_stragglers(tmp_path: Path):
    """Rank 0 prepares the data 15 s longer than usual, with distributed.timeout_s = 6: rank 1 waits outside any
    collective, with progress lines, and the run trains; 40 steps of equal ranks give no straggler warning."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            distributed={"timeout_s": 6, "hang_report_s": 4},
            train={"max_steps": 40, "log_every": 4},
            model={"factory": "factories:slow_setup_gpt", "factory_kwargs": {"seconds": 15, "n_layer": 2, "n_head": 2, "d_model": 32}},
        ),
    )
    proc = check(train(config, 2))
    lines = launcher_lines(proc.stderr)
    waits = [line for line in lines if line.startswith("launcher: set-up: the other ranks wait for rank 0 to finish preparing the data: ")]
    assert len(waits) >= 4 and all(line.endswith(" s so far (not a hang; distributed.setup_timeout_s = 7200 s)") for line in waits), lines
    assert [line for line in lines if line not in waits] == []  # no hang report, no straggler warning
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(4, 41, 4))
    assert all(r["slowest_host"] == HOST and r["slowest_rank"] in (0, 1) for r in rows)


def test_a_slow_rank_is_named_by_one_straggler_warning(tmp_path: Path):
    """Rank 1 sleeps 150 ms in each forward (two per step): several times its compute per step, and 0.3 s per step
    more than the other's, over distributed.straggler_min_lag_s."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            train={"max_steps": 12, "log_every": 2},
            model={"factory": "factories:slow_gpt", "factory_kwargs": {"rank": 1, "seconds": 0.15, "n_layer": 2, "n_head": 2, "d_model": 32}},
        ),
    )
    proc = check(train(config, 2))
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert [r["slowest_rank"] for r in rows] == [1] * 6 and all(r["slowest_lag"] > 2 for r in rows), rows
    [warning] = launcher_lines(proc.stderr)
    assert warning.startswith(f"launcher: warning: rank 1 (host {HOST}) is a straggler: it computes ")
    assert " for 3 log intervals in a row, and every rank waits for it" in warning


def test_the_report_line_names_ranges_and_silent_ranks():
    from launcher.hang import compose, ranks_text

    assert ranks_text([0, 1, 2, 5, 7, 8]) == "ranks 0-2, 5, 7-8" and ranks_text([3]) == "rank 3"
    beat = {"host": "h", "pid": 10, "step": 7, "phase": "backward", "entered": 9, "left": 8, "collective": "all-reduce"}
    beats = {r: {**beat, "pid": 10 + r, "where": "launcher/loop.py:5", "call": "x()"} for r in range(4)}
    beats[3] = {**beats[3], "entered": 8, "left": 8, "phase": "forward"}
    assert compose(beats, silent={3}) == (
        "hang at step 7: rank 3 (host h, pid 13) does not answer (stopped, dead or unreachable; last seen in forward at step 7);"
        " ranks 0-2 wait in all-reduce #9 at launcher/loop.py:5; rank 3 entered #8 only"
    )
