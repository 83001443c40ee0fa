"""What the hang report costs a training step: side by side, with and without it.

1. The parts on the step's path, in one process: the loop's phase marker (`launcher.hang.mark`, six per step with
   accumulation 2) and a counted against an uncounted all-reduce (the wrapper around torch.distributed's
   collectives) on a one-rank gloo group; each timed over many calls, medians of 5 rounds.
2. Whole runs: 2-process `launcher train` on CPU (gloo), alternating the watchdog on (distributed.hang_report_s
   below timeout_s) and off (hang_report_s above it), each side's median s_per_step of its metrics rows (the first
   row, with the warm-up, left out).

Run from the repository root:
  .venv/bin/python benchmarks/hang_report_cost.py                # both parts, 3 rounds of 2-process runs
  .venv/bin/python benchmarks/hang_report_cost.py --rounds 1 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def per_call_us(fn, calls: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


def parts() -> None:
    import torch
    import torch.distributed as dist

    from launcher import hang

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
    tensor = torch.zeros(4)
    per_call_us(lambda: dist.all_reduce(tensor), 2000)  # warm-up
    plain = per_call_us(lambda: dist.all_reduce(tensor), 2000)
    hang.count_collectives()
    counted = per_call_us(lambda: dist.all_reduce(tensor), 2000)
    marker = per_call_us(lambda: hang.mark("forward", 3), 200000)
    print(f"phase marker: {marker * 1000:.0f} ns per call ({6 * marker:.2f} us per step of 2 micro-steps)")
    print(f"all-reduce of 4 floats, 1-rank gloo: {plain:.1f} us uncounted, {counted:.1f} us counted ({counted - plain:+.1f} us)")
    dist.destroy_process_group()


def run(tmp: Path, name: str, steps: int, hang_report_s: float) -> float:
    out = tmp / name
    cmd = [sys.executable, "-m", "launcher", "train", str(REPO / "configs" / "default.yaml"), f"output_dir={out}"]
    cmd += ["launch.nproc_per_node=2", f"train.max_steps={steps}", "train.log_every=10", "eval.at_start=false"]
    cmd += ["distributed.timeout_s=600", f"distributed.hang_report_s={hang_report_s}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["s_per_step"] for r in rows if "s_per_step" in r and r["step"] > 10)


def runs(rounds: int, steps: int) -> None:
    with_report, without = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            with_report.append(run(Path(tmp), f"on-{i}", steps, hang_report_s=120))
            without.append(run(Path(tmp), f"off-{i}", steps, hang_report_s=1e9))
            print(f"round {i + 1}: {with_report[-1] * 1000:.1f} ms per step with the watchdog, {without[-1] * 1000:.1f} ms without")
    on, off = statistics.median(with_report), statistics.median(without)
    print(f"2 processes, {steps} steps, median of {rounds}: {on * 1000:.1f} ms with vs {off * 1000:.1f} ms without ({on / off:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    parts()
    runs(args.rounds, args.steps)


if __name__ == "__main__":
    main()
