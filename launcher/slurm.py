"""SLURM: the facts of the job this process runs in, the defaults they imply, and telling the job script (or
SLURM) that a run stopped and wants a requeue. Nothing here imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def restart_count() -> int:
    """SLURM_RESTART_COUNT: 0 for a job's first start, N after N requeues (by the job script or by SLURM's preemption)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", 0)) if in_slurm_job() else 0
    except ValueError:
        return 0


def default_resume() -> str | None:
    """`resume` when the config leaves it unset: `auto` for a restarted SLURM job (it continues its own run), else none.
    A first start follows the normal output_dir rules, inside SLURM as anywhere."""
    return "auto" if restart_count() >= 1 else None


def default_checkpoint_minutes() -> float | None:
    """checkpoint.every_minutes when the config leaves it unset: 30 inside a SLURM job (a preemption without a
    warning, a dead node, loses at most that much), else off."""
    return 30.0 if in_slurm_job() else None


STOP_FILE = "LAUNCHER_STOP_FILE"  # set by slurm/*.sbatch: the batch shell reads it once the step has ended


def report_stop(output_dir: Path, step: int, requeue: bool) -> None:
    """Main process, after a stop checkpoint inside a SLURM job: tell the job script, or requeue from here.

    Under slurm/*.sbatch (LAUNCHER_STOP_FILE) this writes that file and the batch shell decides, on the host, once
    the step has ended: it requeues the job after the requeue signal, and after a SLURM preemption (whose job would
    otherwise end COMPLETED when it stops within the grace time); never after a cancel. That works in containers
    without `scontrol` and never kills a save. Without the job script: `scontrol requeue` from here for the requeue
    signal (it kills the job at once: call this only once the checkpoint is complete)."""
    if not in_slurm_job():
        return
    job = os.environ["SLURM_JOB_ID"]
    stop_file = os.environ.get(STOP_FILE)
    if stop_file:
        try:
            Path(stop_file).write_text(json.dumps({"job": job, "step": step, "requeue": requeue, "output_dir": str(output_dir)}) + "\n")
        except OSError as err:
            print(
                f"launcher: warning: could not tell the job script about the stop ({STOP_FILE}={stop_file}: {err.strerror});"
                f" requeue job {job} by hand to continue",
                file=sys.stderr,
            )
        return
    if not requeue:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=False)
    except FileNotFoundError:
        print(
            f"launcher: warning: no scontrol here (a container?): job {job} is not requeued;"
            f" submit through slurm/train.sbatch, which requeues from the batch shell",
            file=sys.stderr,
        )
