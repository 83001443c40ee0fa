"""Time from start to the first step after resuming at step 10 and at step 10,000: the data position is O(1).

A small model trains 10,000 steps once, keeping checkpoints at steps 10 and 10,000; then each is
resumed for exactly one more step, several times, and the wall time of those runs (process start,
set-up, loading the checkpoint, seeking the data, one step, the final save) is compared. A loader
that skipped batches by iterating would take time proportional to the step.

Run from the repository root (about 2 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/resume_cost.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FAR = 10_000


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp / "train"),
                "model": {"n_layer": 1, "n_head": 1, "d_model": 16},
                "data": {"seq_len": 16, "eval_fraction": 0},
                "train": {"micro_batch_size": 1, "max_steps": FAR, "log_every": 1000, "warmup_steps": 0},
                "checkpoint": {"every_steps": 10},
            }
        )
    )
    started_s = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher", "train", str(config)], cwd=REPO, check=True, capture_output=True)
    print(f"trained {FAR} steps in {time.perf_counter() - started_s:.0f}s")
    kept = tmp / "kept"
    kept.mkdir()
    for step in (10, FAR):
        shutil.copytree(tmp / "train" / "checkpoints" / f"step-{step:09d}", kept / f"step-{step:09d}")

    timings = {10: [], FAR: []}
    for _ in range(3):
        for step in (10, FAR):
            out = tmp / f"resume-{step}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "launcher",
                "train",
                str(config),
                f"output_dir={out}",
                f"resume={kept / f'step-{step:09d}'}",
                f"train.max_steps={step + 1}",
            ]
            started_s = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            timings[step].append(time.perf_counter() - started_s)
            assert proc.returncode == 0 and f"at step {step}" in proc.stdout, proc.stderr[-2000:]
    for step, times in timings.items():
        print(
            f"resume at step {step:>6}: {statistics.median(times):.2f}s to run one more step (median of 3: "
            + ", ".join(f"{t:.2f}" for t in times)
            + ")"
        )
    print(f"ratio step {FAR} / step 10: {statistics.median(timings[FAR]) / statistics.median(timings[10]):.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
