"""A private one-node SLURM cluster for tests: its own slurm.conf, state and ports under a temp dir.

Installs Debian's slurm-wlm and munge when missing (as root), starts munged only if none runs, then
slurmctld and slurmd, and stops exactly the daemons it started (by the PIDs they wrote).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env, capture_output=True)


class SlurmCluster:
    """`grace_s`: two partitions with real preemption instead of one: `low` (the default) and `high`, whose jobs
    preempt `low` jobs that hold the CPUs they need (PreemptMode=REQUEUE: SIGTERM, GraceTime `grace_s`, then
    SIGKILL, and SLURM requeues the job itself)."""

    def __init__(self, root: Path, grace_s: int | None = None):
        self.root = root
        self.grace_s = grace_s
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.pid_files: list[Path] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> SlurmCluster:
        ensure_installed()
        self._start_munge_if_needed()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._conf_text())
        subprocess.run(["slurmctld", "-f", str(self.conf), "-c"], check=True, env=self.env)
        self.pid_files.append(self.root / "slurmctld.pid")
        self._start_nodes()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.split()
            if states and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test SLURM nodes did not become idle (states: {states!r}); see {self.root}/log")

    def _start_nodes(self) -> None:
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self.pid_files.append(self.root / f"slurmd-{self.host}.pid")

    def _controller(self) -> str:
        return self.host

    def _node_lines(self) -> str:
        return f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN"

    def _conf_text(self) -> str:
        return f"""ClusterName=launchertest
SlurmctldHost={self._controller()}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
{self._node_lines()}
{self._partition_lines()}
"""

    def _partition_lines(self) -> str:
        if self.grace_s is None:
            return "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        return f"""PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=low Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_s}
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"""

    def _start_munge_if_needed(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is running: use it, and leave it running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        pid_file = Path("/run/munge/launcher-tests-munged.pid")  # the munge user must be able to write it
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force", f"--pid-file={pid_file}"], check=True)
        self.pid_files.append(pid_file)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        """Submit; the job gets `env` (sbatch exports the submitting environment)."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**env, "SLURM_CONF": str(self.conf)}, capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        out = subprocess.run(["scontrol", "show", "job", str(job_id)], env=self.env, capture_output=True, text=True).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def wait(self, job_id: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"):
                return state
            time.sleep(1)
        return self.job_state(job_id)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 30  # let the jobs' processes end before their daemons go
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
        for pid_file in reversed(self.pid_files):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


class TwoNodeCluster(SlurmCluster):
    """Two SLURM nodes on this machine: each slurmd in its own network namespace with its own hostname and
    address on a private /24 bridge that this class creates and removes; one slurmctld on the bridge.

    slurmd is started through `nsenter --net` plus new UTS and mount namespaces (hostname, /etc/hosts);
    `ip netns exec` would remount /sys and hide the cgroup filesystem slurmd needs.
    """

    def __init__(self, root: Path):
        super().__init__(root)
        tag = os.getpid() % 200 + 20
        self.subnet = f"10.{tag}.77"
        self.bridge = f"ltbr{tag}"
        self.names = [f"lt{tag}n1", f"lt{tag}n2"]  # hostnames, namespaces and SLURM node names
        self.addresses = {name: f"{self.subnet}.{11 + i}" for i, name in enumerate(self.names)}
        self.made_links: list[str] = []
        self.made_namespaces: list[str] = []

    def start(self) -> TwoNodeCluster:
        try:
            self._make_network()
            return super().start()
        except BaseException:
            self.stop()
            raise

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _make_network(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.made_links.append(self.bridge)
        self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for name in self.names:
            self._ip("netns", "add", name)
            self.made_namespaces.append(name)
            host_end, node_end = f"{name}h", f"{name}p"
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self.made_links.append(host_end)
            self._ip("link", "set", node_end, "netns", name)
            self._ip("link", "set", host_end, "master", self.bridge, "up")
            self._ip("-n", name, "addr", "add", f"{self.addresses[name]}/24", "dev", node_end)
            self._ip("-n", name, "link", "set", node_end, "up")
            self._ip("-n", name, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost", f"{self.subnet}.1 {self.host}"]
        hosts += [f"{address} {name}" for name, address in self.addresses.items()]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def _controller(self) -> str:
        return f"{self.host}({self.subnet}.1)"

    def _node_lines(self) -> str:
        return "\n".join(
            f"NodeName={name} NodeAddr={address} NodeHostname={name} CPUs=2 RealMemory=2000 State=UNKNOWN" for name, address in self.addresses.items()
        )

    def _start_nodes(self) -> None:
        for name in self.names:
            inner = f"hostname {name}; mount --bind {self.root / 'hosts'} /etc/hosts; exec slurmd -f {self.conf} -N {name}"
            subprocess.run(
                ["nsenter", f"--net=/run/netns/{name}", "unshare", "--uts", "--mount", "--propagation", "private", "bash", "-c", inner],
                check=True,
                env=self.env,
            )

    def stop(self) -> None:
        super().stop()
        # everything still running in a node's namespace was started by this cluster: its slurmd, job steps, workers
        for name in self.made_namespaces:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(1)
        for name in reversed(self.made_namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for link in reversed(self.made_links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
