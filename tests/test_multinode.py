"""Two SLURM nodes on one machine (network namespaces on a private bridge), the real slurm/train.sbatch
launching 2 gloo processes on each: the same training as one node, preemption across nodes, and a dead node
ending the job promptly."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, check, final_weights, metrics, run_cli, submit_job, tiny_config, write_config
from slurm_cluster import TwoNodeCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, a bridge and the SLURM daemons need root")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2")).start()
    yield cluster
    cluster.stop()


def submit(cluster, tmp_path: Path, config: Path, out: Path, *overrides: str) -> int:
    return submit_job(cluster, tmp_path, config, out, *overrides, nodes=2)


def log_of(tmp_path: Path, job: int) -> str:
    return (tmp_path / f"slurm-{job}.out").read_text()


def two_node_config(tmp_path: Path, **train) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        tiny_config(
            tmp_path,
            freeze=["pos_embed.*"],
            train={"max_steps": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, **train},
        ),
    )


BACKEND_OVERRIDES = {"ddp": [], "zero2": ["deepspeed=configs/deepspeed/zero2.json"], "fsdp2": ["fsdp={}"]}


@pytest.mark.parametrize("backend", ["ddp", "zero2", "fsdp2"])
def test_two_nodes_train_like_one_node(cluster, tmp_path: Path, backend: str):
    """2 nodes x 2 processes x 2 micro-steps against 1 node x 2 processes x 4 micro-steps: the same global batch of 16,
    under each backend (FSDP2 shards over 4 ranks on two nodes, over 2 on one).
    Tolerance: losses and grad norms 1e-5, weights 1e-5 absolute (summation order differs)."""
    if backend == "zero2":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
    overrides = BACKEND_OVERRIDES[backend]
    config = two_node_config(tmp_path)
    job = submit(cluster, tmp_path, config, tmp_path / "two", *overrides)
    state = cluster.wait(job, 300)
    assert state == "COMPLETED", log_of(tmp_path, job)[-4000:]
    assert "2 node(s) x 2 process(es)" in log_of(tmp_path, job)
    assert "world size 4" in log_of(tmp_path, job)
    assert {"ddp": "DDP (gloo)", "zero2": "DeepSpeed ZeRO-2", "fsdp2": "FSDP2"}[backend] in log_of(tmp_path, job)
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'one'}", "train.gradient_accumulation_steps=4", *overrides, nproc=2))
    two = [r for r in metrics(tmp_path / "two") if "loss" in r]
    one = [r for r in metrics(tmp_path / "one") if "loss" in r]
    assert len(two) == len(one) == 8
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w2, w1 = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for name, tensor in w1.items():
        torch.testing.assert_close(w2[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_two_node_job_preempted_requeues_and_resumes_bitwise(cluster, tmp_path: Path):
    config = two_node_config(tmp_path, max_steps=30, log_every=1)
    straight = submit(cluster, tmp_path, config, tmp_path / "straight")
    assert cluster.wait(straight, 400) == "COMPLETED", log_of(tmp_path, straight)[-4000:]

    out = tmp_path / "preempted"
    job = submit(cluster, tmp_path, config, out)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or len([r for r in metrics(out) if "loss" in r]) < 4:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)  # to every rank on both nodes
    state = cluster.wait(job, 500)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert log.count("preempted: stopped after step") == 1  # one checkpoint, written once for all ranks
    assert f"job {job} restart 1: 2 node(s) x 2 process(es)" in log and "resumed from" in log
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 31))
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


def test_a_dead_node_ends_the_job_promptly(cluster, tmp_path: Path):
    """SIGKILL to the second node's accelerate launch: srun --kill-on-bad-exit ends the whole job well before
    any rendezvous or collective timeout (10 minutes), and the log says which task died."""
    config = two_node_config(tmp_path, max_steps=100000, log_every=1)
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, config, out)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or not [r for r in metrics(out) if "loss" in r]:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    agents = []
    for pid in subprocess.run(["ip", "netns", "pids", cluster.names[1]], capture_output=True, text=True).stdout.split():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"accelerate.commands.launch" in argv and argv[argv.index(b"--machine_rank") + 1] == b"1":
            agents.append(pid)
    assert len(agents) == 1, "the second node's launcher agent not found"
    killed_at = time.monotonic()
    os.kill(int(agents[0]), signal.SIGKILL)
    state = cluster.wait(job, 120)
    ended_s = time.monotonic() - killed_at
    log = log_of(tmp_path, job)
    assert state in ("FAILED", "CANCELLED"), (state, log[-3000:])
    assert ended_s < 60, f"the job took {ended_s:.0f}s to end"
    assert f"srun: error: {cluster.names[1]}: task 1: Killed" in log, log[-3000:]  # names the node and task that died
    print(f"job ended {ended_s:.1f}s after its second node's launcher was killed")


def test_a_node_local_output_dir_is_refused_at_start(cluster, tmp_path: Path):
    """output_dir on a disk only one node sees (a private tmpfs mounted in the second node's mount namespace): rank 0
    probes it, the second node's ranks do not see the probe, and every rank stops with one line, before training."""
    local = tmp_path / "local"
    local.mkdir()
    slurmd = (cluster.root / f"slurmd-{cluster.names[1]}.pid").read_text().strip()
    subprocess.run(["nsenter", "-t", slurmd, "-m", "mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(local)], check=True)
    try:
        job = submit(cluster, tmp_path, two_node_config(tmp_path), local / "out")
        state = cluster.wait(job, 300)
        log = log_of(tmp_path, job)
        assert state == "FAILED", log[-3000:]
        line = (
            f"launcher: error: output_dir: '{local / 'out'}' is not the same folder on every node: rank 2 (on {cluster.names[1]})"
            f" does not see rank 0's files there (a node-local disk?); put output_dir on a file system shared by all nodes"
        )
        assert log.count(line) == 1, log[-3000:]
        assert f"{REPO}/launcher/" not in log and "step/s" not in log  # no traceback of the launcher's (only the agents' exit reports)
        assert list(local.iterdir()) == []  # rank 0's probe removed; nothing written
    finally:
        subprocess.run(["nsenter", "-t", slurmd, "-m", "umount", str(local)], check=False)
