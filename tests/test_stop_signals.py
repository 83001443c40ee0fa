"""Stop signals and their meanings, restarts as the only implicit resumes, job-array placeholders, time-based
checkpoints agreed across ranks, and a hung rank ending the run after distributed.timeout_s (with per-rank logs)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launcher.checkpoints import complete_checkpoints, verify_checkpoint
from launcher.config import load_config
from launcher.errors import UsageError
from launcher.preemption import PreemptionFlag
from launcher.slurm import default_checkpoint_minutes, default_resume, report_stop

from conftest import REPO, check, cpu_env, run_cli, tiny_config, torchrun, write_config


def test_placeholders_fill_from_the_slurm_job(tmp_path: Path, monkeypatch):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "118")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "117")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    cfg = load_config(config, ["output_dir=runs/{array_job_id}/{array_task_id}", "data.cache_dir=/tmp/c-{job_id}"], job_values=True)
    assert cfg.output_dir == Path("runs/117/3") and cfg.data.cache_dir == Path("/tmp/c-118")
    assert load_config(config, ["output_dir=runs/{array_task_id}"]).output_dir == Path("runs/{array_task_id}")  # plan: as written
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(UsageError) as err:
        load_config(config, ["output_dir=runs/{array_task_id}"], job_values=True)
    assert err.value.lines == [
        "'runs/{array_task_id}': {array_task_id} is filled only inside a SLURM job array (sbatch --array)"
        " (SLURM_ARRAY_TASK_ID is not set); give a plain value"
    ]


def test_only_a_restarted_job_resumes_implicitly(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert default_resume() is None and default_checkpoint_minutes() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert default_resume() is None and default_checkpoint_minutes() == 30  # a first start: the normal output_dir rules
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert default_resume() is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert default_resume() == "auto"


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_each_signal_has_its_meaning(restore_handlers, monkeypatch, capfd):
    flag = PreemptionFlag()
    assert flag.agreed() == (False, False, False, False)
    os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal (capfd: the streams are files here, and are kept)
    assert flag.agreed() == (True, False, False, False)  # stop, no requeue: like SIGTERM
    flag = PreemptionFlag()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.agreed(time_due=True) == (True, True, False, True)  # stop, requeue
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.agreed(fault=True) == (True, False, True, False)  # SIGTERM wins: stop without a requeue
    monkeypatch.setenv("LAUNCHER_REQUEUE_SIGNAL", "USR2")
    flag = PreemptionFlag()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.agreed().requeue
    monkeypatch.setenv("LAUNCHER_REQUEUE_SIGNAL", "TERM")
    with pytest.raises(UsageError, match="LAUNCHER_REQUEUE_SIGNAL: 'TERM' cannot be the requeue signal"):
        PreemptionFlag()


def test_requeue_without_scontrol_warns_in_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("LAUNCHER_STOP_FILE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, as in a container
    report_stop(tmp_path, 5, requeue=True)
    assert capsys.readouterr().err == (
        "launcher: warning: no scontrol here (a container?): job 41 is not requeued;"
        " submit through slurm/train.sbatch, which requeues from the batch shell\n"
    )
    monkeypatch.setenv("LAUNCHER_STOP_FILE", str(tmp_path / "stop"))
    report_stop(tmp_path, 5, requeue=False)
    assert json.loads((tmp_path / "stop").read_text()) == {"job": "41", "step": 5, "requeue": False, "output_dir": str(tmp_path)}


def test_time_based_checkpoints_are_agreed_across_ranks(tmp_path: Path):
    """checkpoint.every_minutes shorter than a step: rank 0's clock makes every step a checkpoint, on both ranks."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, checkpoint={"every_minutes": 1e-9}))
    check(run_cli("train", str(config), nproc=2))
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [f"step-{s:09d}" for s in (1, 2, 3, 4)]
    assert json.loads((tmp_path / "out" / "checkpoints" / "step-000000004" / "trainer_state.json").read_text())["step"] == 4


def test_a_signal_on_one_rank_of_four_stops_every_rank_after_the_same_step(tmp_path: Path):
    """SIGUSR1 reaches rank 2 alone, in the first micro-step of step 2 (log_every 100: no metrics row to carry it).
    The agreement sent as step 3 starts carries it, so all 4 ranks stop after step 3 with one checkpoint: one step
    later than a blocking agreement, which no rank waits for any more (launcher.agreement)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 6, "log_every": 100}))
    cmd = torchrun(4, str(REPO / "tests" / "workers" / "train_with_signal.py"), str(config), "2")
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO), SIGNAL_RANK="2"), capture_output=True, text=True, timeout=300)
    stops = sorted(line for line in proc.stdout.splitlines() if "stopped after step" in line)
    assert stops == [f"rank {rank}: stopped after step 3, preempted True" for rank in range(4)], proc.stderr[-3000:]
    out = tmp_path / "out"
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == 3 and marker["requeue"] is True, marker
    assert [p.name for p in complete_checkpoints(out)] == ["step-000000003"]  # once, for every rank
    verify_checkpoint(out / "checkpoints" / "step-000000003")


def test_a_hung_rank_ends_the_run_after_the_timeout(tmp_path: Path):
    """Rank 1 hangs for 30 minutes in its third forward; with distributed.timeout_s=8 (default 600), rank 0's collective
    fails after 8 s and the run ends within a few minutes even on a loaded machine. Every rank's output is also in
    output_dir/logs/rank-N.log."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            distributed={"timeout_s": 8},
            train={"max_steps": 6},
            model={
                "factory": "factories:hanging_gpt",
                "factory_kwargs": {"rank": 1, "forward": 3, "seconds": 1800, "n_layer": 2, "n_head": 2, "d_model": 32},
            },
        ),
    )
    cmd = torchrun(2, "-m", "launcher", "train", str(config))
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO / "tests"), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2"), capture_output=True, text=True, timeout=400
    )
    ended_s = time.monotonic() - started
    assert proc.returncode != 0 and ended_s < 240, (ended_s, proc.stderr[-3000:])
    assert "Timed out" in proc.stderr or "timed out" in proc.stderr, proc.stderr[-3000:]
    logs = tmp_path / "out" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "2 process(es), 1 CPU thread(s) each" in (logs / "rank-0.log").read_text()
    assert "imed out" in (logs / "rank-0.log").read_text()  # the failing collective's traceback, in rank 0's own log
    print(f"the run ended {ended_s:.0f} s after it started (timeout 8 s, hang 1800 s)")
