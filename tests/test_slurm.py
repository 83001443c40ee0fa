"""The real slurm/ scripts on a real (private, one-node) SLURM cluster, in CPU mode with 2 gloo processes, with
partition-priority preemption configured (`low`, the default partition, is preempted by `high`: PreemptMode=REQUEUE,
GraceTime 90 s). Each signal has its meaning: the requeue signal (USR1) checkpoints and the job script requeues the
job; a real preemption checkpoints within the grace time (even when the save takes longer than torch's 30-second
agent timeout) and the job comes back; a plain scancel ends CANCELLED. Every restarted job ends with weights
bitwise equal to those of an uninterrupted job."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, cpu_env, disk_snapshot, final_weights, metrics, submit_job, tiny_config, wait_for_rows, write_config
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test SLURM cluster runs its daemons as root")
STEPS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), grace_s=90).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """One config for every training job here, and its uninterrupted run: (tmp dir, config, output_dir)."""
    tmp = tmp_path_factory.mktemp("reference")
    # dropout on, so that a resume must restore every rank's RNG; no periodic checkpoint before the end: the one
    # resumed is the stop's; the model takes SLOW_SAVE_S more seconds to save once signalled (only where set)
    config = write_config(
        tmp / "c.yaml",
        tiny_config(
            tmp,
            model={"factory": "factories:slow_stop_save_gpt", "factory_kwargs": {"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1}},
            eval={"every_steps": 10},
            train={"max_steps": STEPS, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "log_every": 1},
            checkpoint={"every_steps": 50},
        ),
    )
    job = submit_job(cluster, tmp, config, tmp / "straight")
    assert cluster.wait(job, 400) == "COMPLETED", log_of(tmp, job)[-3000:]
    return tmp, config, tmp / "straight"


def log_of(tmp_path: Path, job: int) -> str:
    return (tmp_path / f"slurm-{job}.out").read_text()


def wait_for_steps(cluster, job: int, out: Path, steps: int, timeout_s: float = 300) -> None:
    wait_for_rows(out, steps, lambda: cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), timeout_s, poll_s=0.2)


def restarts(cluster, job: int) -> int:
    out = subprocess.run(["scontrol", "show", "job", str(job)], env=cluster.env, capture_output=True, text=True).stdout
    return int(out.split("Restarts=")[1].split()[0])


def assert_same_run(reference: Path, out: Path) -> None:
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    a, b = final_weights(reference), final_weights(out)
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


def test_requeue_signal_checkpoints_requeues_from_the_batch_shell_and_resumes(cluster, reference, tmp_path: Path):
    """USR1 (what --signal=USR1@180 sends): checkpoint, the batch shell requeues (the step has no scontrol: the set-up
    script takes it off PATH), the restart resumes with --overwrite still in its arguments and deletes nothing."""
    _, config, straight = reference
    setup = tmp_path / "setup.sh"
    setup.write_text(
        'mkdir -p "$TMPDIR_NO_SCONTROL"; export PATH="$TMPDIR_NO_SCONTROL"\n'
        'command -v scontrol >/dev/null && echo "setup: scontrol found" || echo "setup on $(hostname): no scontrol"\n'
    )
    out = tmp_path / "run"
    job = submit_job(
        cluster,
        tmp_path,
        config,
        out,
        "--overwrite",
        sbatch_args=("--cpus-per-task=2",),
        env={"SETUP": str(setup), "TMPDIR_NO_SCONTROL": str(tmp_path / "empty-bin"), "SLOW_FORWARD_S": "0.1"},
    )
    wait_for_steps(cluster, job, out, 5)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)
    state = cluster.wait(job, 400)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert log.count("no scontrol") == 2 and "scontrol found" not in log  # the set-up hook ran before both starts
    assert f"job {job} restart 0: 1 node(s) x 2 process(es), 2 CPU(s) per node, OMP_NUM_THREADS=1" in log
    assert "2 process(es), 1 CPU thread(s) each (OMP_NUM_THREADS=1)" in log  # what the ranks see
    assert f"job {job} restart 0: stopped after the requeue signal with a checkpoint: requeued" in log, log[-3000:]
    assert f"--overwrite not applied: this is restart 1 of SLURM job {job}" in log and "resumed from" in log
    assert f"job {job} restart 1: exit 0" in log
    stopped_at = int(log.split("preempted: stopped after step ")[1].split(";")[0])
    assert 5 <= stopped_at < STEPS
    assert not (out / "preempted.json").exists() and not list(tmp_path.glob(".launcher-stop-*"))
    assert (out / "checkpoints" / f"step-{stopped_at:09d}").is_dir()  # --overwrite deleted nothing on the restart
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "resumed from" in (out / "logs" / "rank-0.log").read_text()
    assert_same_run(straight, out)
    print(json.dumps({"stopped_after_step": stopped_at, "job": job}))


def test_real_preemption_with_a_slow_save(cluster, reference, tmp_path: Path):
    """A job in `low` holding a CPU; a `high` job needing both CPUs preempts it: SIGTERM to every process of the step,
    GraceTime 90 s. The save takes 35 s more (longer than torch's 30-second agent timeout), completes, the job comes
    back after the preemptor, resumes and ends bitwise equal to the uninterrupted job."""
    _, config, straight = reference
    out = tmp_path / "run"
    job = submit_job(cluster, tmp_path, config, out, sbatch_args=("--cpus-per-task=1",), env={"SLOW_SAVE_S": "35", "SLOW_FORWARD_S": "0.3"})
    wait_for_steps(cluster, job, out, 5)
    high = cluster.sbatch(
        "--partition=high", "--cpus-per-task=2", f"--output={tmp_path}/high-%j.out", "--wrap", "sleep 5", cwd=tmp_path, env=cpu_env()
    )
    state = cluster.wait(job, 600)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert cluster.wait(high, 60) == "COMPLETED"
    assert "slow save: 35 s more" in log and "(SIGTERM, SIGHUP or Ctrl-C)" in log, log[-4000:]
    assert f"job {job} restart 0: stopped after a preemption with a checkpoint: requeued" in log, log[-4000:]
    assert "warning: 1 CPU(s) for 2 processes per node" in log
    stopped_at = int(log.split("stopped after step ")[1].split(" ")[0])
    assert f"resumed from {out}/checkpoints/step-{stopped_at:09d} at step {stopped_at}" in log
    assert restarts(cluster, job) == 1
    assert_same_run(straight, out)


def test_scancel_ends_cancelled_after_a_checkpoint(cluster, reference, tmp_path: Path):
    """A plain scancel: SIGTERM, a checkpoint within KillWait (10 s), and the job stays CANCELLED: never requeued."""
    _, config, _ = reference
    out = tmp_path / "run"
    job = submit_job(cluster, tmp_path, config, out, "train.max_steps=100000", env={"SLOW_FORWARD_S": "0.1"})
    wait_for_steps(cluster, job, out, 3)
    subprocess.run(["scancel", str(job)], env=cluster.env, check=True)
    assert cluster.wait(job, 120) == "CANCELLED"
    time.sleep(15)  # longer than a requeued job takes to start here
    assert cluster.job_state(job) == "CANCELLED" and restarts(cluster, job) == 0
    stop = json.loads((out / "preempted.json").read_text())
    assert stop["requeue"] is False and Path(stop["checkpoint"]).is_dir(), log_of(tmp_path, job)[-3000:]


def test_a_first_job_into_a_finished_run_is_refused(cluster, reference):
    tmp, config, straight = reference
    before = disk_snapshot(straight)
    job = submit_job(cluster, tmp, config, straight)
    assert cluster.wait(job, 300) == "FAILED"
    log = log_of(tmp, job)
    assert f"launcher: error: output_dir: '{straight}' already exists and is not empty" in log, log[-3000:]
    assert disk_snapshot(straight) == before


def test_job_array_of_one_process_jobs_writes_one_folder_per_task(cluster, tmp_path: Path):
    """slurm/debug.sbatch (one process) as a 2-task array into output_dir=runs/{array_task_id}; 2 CPUs per task
    give the one process 2 threads."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 3}))
    job = cluster.sbatch(
        "--array=0-1",
        "--cpus-per-task=2",
        f"--output={tmp_path}/slurm-%A_%a.out",
        f"--chdir={REPO}",
        str(REPO / "slurm" / "debug.sbatch"),
        str(config),
        f"output_dir={tmp_path}/runs/{{array_task_id}}",
        cwd=tmp_path,
        env=cpu_env(PYTHON=PYTHON),
    )
    deadline = time.monotonic() + 400
    while subprocess.run(["squeue", "-h", "-j", str(job)], env=cluster.env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(1)
    for task in (0, 1):
        log = (tmp_path / f"slurm-{job}_{task}.out").read_text()
        assert "1 process(es), 2 CPU thread(s) each (OMP_NUM_THREADS=2)" in log and "single process: global batch 4 " in log, log[-3000:]
        # a log file gets one plain line per metrics row, not the progress bar's carriage-return frames
        assert "\r" not in log
        assert [line.split(" |")[0] for line in log.splitlines() if re.match(r"step \d+/3 \| loss ", line)] == ["step 1/3", "step 2/3", "step 3/3"]
        assert (tmp_path / "runs" / str(task) / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["0", "1"]


def test_deepspeed_through_the_same_script(cluster, tmp_path: Path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    config = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path, train={"max_steps": 3, "micro_batch_size": 4}, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")),
    )
    job = submit_job(cluster, tmp_path, config, tmp_path / "out")
    state = cluster.wait(job, 300)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-3000:]
    assert "DeepSpeed ZeRO-2: global batch 16 = micro-batch 4 x accumulation 2 x world size 2" in log
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_job_scripts_share_their_body():
    """debug.sbatch is train.sbatch with another header: the part below the marker line is the same text."""
    marker = "# ---- the same below this line"
    bodies = [(REPO / "slurm" / name).read_text().split(marker)[1] for name in ("train.sbatch", "debug.sbatch")]
    assert bodies[0] == bodies[1]
