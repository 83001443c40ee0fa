"""The real slurm/ scripts on a real (private, one-node) SLURM cluster, in CPU mode with 2 gloo processes:
a job sent the preemption signal mid-run checkpoints, requeues itself, resumes and completes with
SLURM_RESTART_COUNT >= 1, and ends with weights bitwise equal to those of an uninterrupted job."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, final_weights, metrics, submit_job, tiny_config, write_config
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test SLURM cluster runs its daemons as root")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def slurm_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, model={"dropout": 0.1}, eval={"every_steps": 5},
        train={"max_steps": 40, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "log_every": 1},
        checkpoint={"every_steps": 50}))  # no periodic checkpoint before the end: the one resumed is the preemption's


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_job(cluster: SlurmCluster, tmp_path: Path):
    config = slurm_config(tmp_path)
    straight = submit_job(cluster, tmp_path, config, tmp_path / "straight")
    assert cluster.wait(straight, 300) == "COMPLETED", (tmp_path / f"slurm-{straight}.out").read_text()[-3000:]

    out = tmp_path / "preempted"
    job = submit_job(cluster, tmp_path, config, out)
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() or len([r for r in metrics(out) if "loss" in r]) < 5:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)  # what --signal=USR1@T sends
    state = cluster.wait(job, 400)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert f"job {job} restart 1: 1 node(s) x 2 process(es)" in log, log[-3000:]  # SLURM_RESTART_COUNT=1
    assert "DUE TO JOB REQUEUE" in log and f"job {job} restart 1: exit 0" in log
    assert "resumed from" in log and "preempted: stopped after step" in log
    stopped_at = int(log.split("preempted: stopped after step ")[1].split(";")[0])
    assert 5 <= stopped_at < 40
    assert not (out / "preempted.json").exists()
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name
    print(json.dumps({"stopped_after_step": stopped_at, "job": job}))


def test_debug_script_runs_one_process(cluster: SlurmCluster, tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 3}))
    job = submit_job(cluster, tmp_path, config, tmp_path / "out", script="debug.sbatch")
    state = cluster.wait(job, 300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "single process: global batch 4 " in log and f"job {job} restart 0: exit 0" in log
    # a log file gets one plain line per metrics row, not the progress bar's carriage-return frames
    assert "\r" not in log
    assert [line.split(" |")[0] for line in log.splitlines() if re.match(r"step \d+/3 \| loss ", line)] == ["step 1/3", "step 2/3", "step 3/3"]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_deepspeed_through_the_same_script(cluster: SlurmCluster, tmp_path: Path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    config = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, train={"max_steps": 3, "micro_batch_size": 4}, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")))
    job = submit_job(cluster, tmp_path, config, tmp_path / "out")
    state = cluster.wait(job, 300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "DeepSpeed ZeRO-2: global batch 16 = micro-batch 4 x accumulation 2 x world size 2" in log
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
