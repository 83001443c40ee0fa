"""How a plain multi-process `launcher train` (launch.nproc_per_node: 2, relaunched under torchrun) ends, whatever
signal comes when: a stop signal during the pre-flight ends it before any process starts; one while the workers start,
or SIGHUP while they train, stops them at a step boundary after a checkpoint (exit 75); a worker killed (kill -9) or
stopped (SIGSTOP) ends the run with one line naming its rank (exit 76). Never a traceback on the console, and the
command returns only once no process of the run is left."""

import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from launcher.checkpoints import complete_checkpoints, verify_checkpoint

from conftest import EXIT_PROBE_MARK, PYTHON, REPO, cpu_env, metrics, tiny_config, train_until_rows, wait_for_rows, write_config

EXIT_PREEMPTED, EXIT_RANK_LOST = 75, 76


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Trains until stopped, a checkpoint every 1000 steps: the only checkpoint is the stop's."""
    return write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 100000}, checkpoint={"every_steps": 1000}))


def start(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "launcher", "train", str(config), "launch.nproc_per_node=2", *overrides],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"never {what}: exit {proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}")
        time.sleep(0.001)


def handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def started_torchrun(pid: int) -> bool:
    """Whether the command `pid` has started torchrun (launcher.distributed.run_agent) as its child."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"run_agent" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def processes_of(config: Path) -> dict[int, bytes]:
    """pid: environment of each live process whose command line names `config` (the command, torchrun, the workers)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(config).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found[int(proc.name)] = (proc / "environ").read_bytes()
        except OSError:
            pass
    return found


def worker_pid(config: Path, rank: int) -> int:
    [pid] = [pid for pid, environ in processes_of(config).items() if f"RANK={rank}".encode() in environ.split(b"\0")]
    return pid


def ended(proc: subprocess.Popen, config: Path, code: int, timeout_s: float = 240) -> tuple[str, str]:
    """The command's output once it returned `code`, with no traceback on its console and no process of the run left."""
    stdout, stderr = proc.communicate(timeout=timeout_s)
    left = processes_of(config)  # at once: the command returned only after every process of the run
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    assert not left, f"processes of the run outlived the command: {sorted(left)}"
    for word in ("Traceback", "ChildFailedError", "SignalException", "torch.distributed", "torch/distributed", EXIT_PROBE_MARK):
        assert word not in stdout + stderr, stderr[-6000:]
    return stdout, stderr


def launcher_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("launcher:")]


def test_a_stop_signal_during_the_preflight_ends_the_run_before_any_process_starts(config: Path, tmp_path: Path):
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        proc = start(config)
        wait_until(lambda proc=proc, signum=signum: handles(proc.pid, signum), proc, "installed its handler")  # then the pre-flight starts
        proc.send_signal(signum)
        _, stderr = ended(proc, config, EXIT_PREEMPTED, timeout_s=120)
        assert launcher_lines(stderr) == [
            f"launcher: stopped by {signum.name} during the pre-flight, before any process started: nothing was trained;"
            " run the command again to start (exit 75)"
        ]
        out = tmp_path / "out"  # no worker wrote there, and the output_dir lock (if the pre-flight took it) is released
        assert not (out / "logs").exists() and not (out / "metrics.jsonl").exists() and not (out / "run.lock").exists()


def test_a_signal_while_the_workers_start_stops_them_after_the_first_step(config: Path, tmp_path: Path):
    """SIGUSR1 as soon as torchrun is started: each worker gets it once its handler exists, and they stop at the first
    step boundary with a checkpoint, a requeue asked for."""
    proc = start(config)
    wait_until(lambda: started_torchrun(proc.pid), proc, "started torchrun")
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = ended(proc, config, EXIT_PREEMPTED)
    out = tmp_path / "out"
    marker = json.loads((out / "preempted.json").read_text())
    assert (marker["step"], marker["requeue"]) == (1, True)
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]
    assert complete_checkpoints(out) == [Path(marker["checkpoint"])]
    verify_checkpoint(Path(marker["checkpoint"]))
    assert "preempted: stopped after step 1" in stdout


def test_sighup_stops_the_workers_after_a_checkpoint_before_the_command_returns(config: Path, tmp_path: Path):
    """A closed terminal means SIGTERM: the command waits for the workers' checkpoint, then exits 75."""
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 2, "launch.nproc_per_node=2")
    proc.send_signal(signal.SIGHUP)
    stdout, _ = ended(proc, config, EXIT_PREEMPTED)
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["requeue"] is False and marker["step"] >= 2
    assert complete_checkpoints(out) == [Path(marker["checkpoint"])]
    verify_checkpoint(Path(marker["checkpoint"]))
    assert f"stopped after step {marker['step']}" in stdout
    assert not (out / "run.lock").exists()


def test_a_closed_terminal_stops_the_run_after_a_checkpoint(config: Path, tmp_path: Path):
    """The run's console is a terminal that goes away (its master end closed: a write to it fails with EIO), then
    SIGHUP: the processes stop writing there, and the run still ends with its checkpoint (exit 75)."""
    out = tmp_path / "out"
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [PYTHON, "-m", "launcher", "train", str(config), "launch.nproc_per_node=2"], cwd=REPO, env=cpu_env(), stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    shown, reading = [], threading.Event()
    reading.set()

    def read_terminal():  # as a terminal does, so that the run never blocks on a full one
        while reading.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    shown.append(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    wait_for_rows(out, 2, lambda: proc.poll() is None)
    reading.clear()
    reader.join(timeout=10)
    os.close(master)  # the terminal is gone
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=240) == EXIT_PREEMPTED
    assert not processes_of(config)
    marker = json.loads((out / "preempted.json").read_text())
    verify_checkpoint(Path(marker["checkpoint"]))
    rank_0 = (out / "logs" / "rank-0.log").read_text()
    assert f"stopped after step {marker['step']}" in rank_0 and "Traceback" not in rank_0
    assert b"Traceback" not in b"".join(shown)


def test_a_killed_worker_ends_the_run_with_one_line_naming_it(config: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 2, "launch.nproc_per_node=2")
    pid = worker_pid(config, 1)
    os.kill(pid, signal.SIGKILL)
    _, stderr = ended(proc, config, EXIT_RANK_LOST)
    assert launcher_lines(stderr) == [
        f"launcher: error: rank 1 (pid {pid}) was killed by SIGKILL; the other ranks were stopped (their output, tracebacks"
        f" included, is in {out}/logs/); resume=auto continues from the newest complete checkpoint"
    ]
    assert "Traceback" in (out / "logs" / "rank-0.log").read_text()  # rank 0's failed collective, in its own log


def test_a_stopped_worker_ends_the_run_after_the_timeout_with_one_line_naming_it(config: Path, tmp_path: Path):
    """Rank 0's collective times out after 10 s; the stopped rank is ended at once (torchrun would wait 30 s)."""
    out = tmp_path / "out"
    proc = train_until_rows(config, out, 2, "launch.nproc_per_node=2", "distributed.timeout_s=10")
    pid = worker_pid(config, 1)
    os.kill(pid, signal.SIGSTOP)
    _, stderr = ended(proc, config, EXIT_RANK_LOST)
    assert launcher_lines(stderr) == [
        f"launcher: error: rank 1 (pid {pid}) stopped responding (its process was stopped: SIGSTOP?): rank 0 gave up waiting"
        f" for it after distributed.timeout_s = 10 s, and the run was ended (their output, tracebacks included, is in"
        f" {out}/logs/); resume=auto continues from the newest complete checkpoint"
    ]
    assert "Traceback" in (out / "logs" / "rank-0.log").read_text()


def test_a_bug_in_one_worker_shows_its_traceback_once_and_one_line(tmp_path: Path):
    """An internal error is no lost rank: the traceback of the rank where it happened, then one line; the other
    rank's failed collective stays in its log."""
    model = {"factory": "factories:raising_gpt", "factory_kwargs": {"rank": 1, "forward": 3, "n_layer": 2, "n_head": 2, "d_model": 32}}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, model=model))
    proc = subprocess.run(
        [PYTHON, "-m", "launcher", "train", str(config), "launch.nproc_per_node=2"],
        cwd=REPO,
        env=cpu_env(PYTHONPATH=str(REPO / "tests")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-6000:]
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" not in proc.stderr, proc.stderr[-6000:]
    assert 'raise ValueError(f"planted bug in forward {self.fail_forward}")' in proc.stderr
    assert launcher_lines(proc.stderr) == [
        f"launcher: error: rank 1 failed: ValueError: planted bug in forward 3 (its traceback is above;"
        f" every rank's output is in {tmp_path / 'out'}/logs/)"
    ]
    assert "Traceback" in (tmp_path / "out" / "logs" / "rank-0.log").read_text()
