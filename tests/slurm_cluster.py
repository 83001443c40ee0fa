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
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.pid_files: list[Path] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> SlurmCluster:
        ensure_installed()
        self._start_munge_if_needed()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=launchertest
SlurmctldHost={self.host}
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
NodeName={self.host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", str(self.conf), "-c"], check=True, env=self.env)
        self.pid_files.append(self.root / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self.pid_files.append(self.root / f"slurmd-{self.host}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test SLURM node did not become idle (state: {state!r}); see {self.root}/log")

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
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**env, "SLURM_CONF": str(self.conf)},
                             capture_output=True, text=True, check=True)
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
        for pid_file in reversed(self.pid_files):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
