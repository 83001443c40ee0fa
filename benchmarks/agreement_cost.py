"""The per-step blocking time of the stop agreement on 2, 4, 8 and 16 gloo ranks: the overlapped design beside the blocking one.

    .venv/bin/python benchmarks/agreement_cost.py [--ranks 2 4 8 16] [--steps 60] [--step-ms 50]

Each rank runs the real code (launcher.preemption.PreemptionFlag on its own gloo group) around a simulated step (a
sleep of --step-ms: on a GPU the host mostly waits for the device too):
- blocking (the design before issue 25): PreemptionFlag.agreed(), an all-reduce that every rank waits for at the
  boundary; its latency grows with the ranks (gloo's ring: 2(N-1) sequential hops for a small tensor);
- overlapped (launcher.agreement.StepAgreement, what the loop uses): start() as the step starts, settle() at its end.
The blocking time of a step is the time the host spends inside those calls. The table gives the median and the 90th
percentile over steps and ranks, the share of overlapped steps whose all-reduce had completed by the step's end
(when it had not, the wait is the rest of it), and a least-squares fit of the blocking design to 2(N-1) hops,
projected to 1,024 ranks. Processes are forked from this one on a free local port; numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, steps: int, step_s: float, results) -> None:
    import torch
    import torch.distributed as dist

    from launcher.agreement import StepAgreement
    from launcher.preemption import PreemptionFlag

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    flag = PreemptionFlag()
    flag.connect(timeout_s=120)
    agreement = StepAgreement(flag)
    warmup = 5
    blocking_s, overlapped_s, arrived = [], [], 0
    for i in range(warmup + steps):
        time.sleep(step_s)  # the step
        started = time.perf_counter()
        flag.agreed()
        if i >= warmup:
            blocking_s.append(time.perf_counter() - started)
    dist.barrier()
    for i in range(warmup + steps):
        started = time.perf_counter()
        agreement.start(False, False)
        spent_s = time.perf_counter() - started
        time.sleep(step_s)  # the step, while gloo's threads run the all-reduce
        started = time.perf_counter()
        everyone = agreement.everyone_started()  # complete already: settle waits for nothing
        agreement.settle(False)
        if i >= warmup:
            overlapped_s.append(spent_s + time.perf_counter() - started)
            arrived += everyone
    dist.barrier()
    results.put((rank, blocking_s, overlapped_s, arrived))
    dist.destroy_process_group()


def measure(world_size: int, steps: int, step_s: float) -> tuple[list[float], list[float], int]:
    context = multiprocessing.get_context("fork")  # no torch imported yet here: the children start cheaply
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=worker, args=(r, world_size, port, steps, step_s, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    blocking, overlapped, arrived = [], [], 0
    for _ in procs:
        _, b, o, a = results.get(timeout=600)
        blocking += b
        overlapped += o
        arrived += a
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"rank process exited {p.exitcode} at world size {world_size}")
    return blocking, overlapped, arrived


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per design and world size")
    parser.add_argument("--step-ms", type=float, default=50.0, help="the simulated step's length")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    us = 1e6
    print(f"{os.cpu_count()} CPU(s), a {args.step_ms:g} ms step, {args.steps} steps per design; blocking time per step in us")
    print(f"{'ranks':>5} | {'blocking median':>15} {'p90':>7} | {'overlapped median':>17} {'p90':>7} {'complete at the end':>19}")
    medians = {}
    for n in args.ranks:
        blocking, overlapped, arrived = measure(n, args.steps, args.step_ms / 1000)
        medians[n] = statistics.median(blocking)
        print(
            f"{n:>5} | {medians[n] * us:>15.0f} {p90(blocking) * us:>7.0f} | "
            f"{statistics.median(overlapped) * us:>17.0f} {p90(overlapped) * us:>7.0f} {arrived / len(overlapped):>19.0%}",
            flush=True,
        )
    if len(medians) > 1:  # blocking ~ a + hop * 2(N-1)
        xs, ys = [2 * (n - 1) for n in medians], list(medians.values())
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        hop_s = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        fixed_s = mean_y - hop_s * mean_x
        print(
            f"blocking design: {hop_s * us:.1f} us per hop + {fixed_s * us:.0f} us; at 1,024 ranks "
            f"{(fixed_s + hop_s * 2 * 1023) * 1e3:.1f} ms per step on this machine's hops, "
            f"{25e-6 * 2 * 1023 * 1e3:.1f} ms at 25 us per hop (TCP across nodes)"
        )


if __name__ == "__main__":
    main()
