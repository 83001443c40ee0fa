"""The hang report: which rank, on which host, at which line, when a multi-process run stops making progress.

Each process keeps a record of where it is (`RECORD`): the step, the phase (data, forward, backward, optimizer,
eval, checkpoint, export) and the sequence number of the last collective it entered and left. The loop updates it
with plain attribute writes (`mark`): no sync, no I/O, no collective. Collectives are counted by wrapping
torch.distributed's functions (the launcher's own, Accelerate's, DeepSpeed's and FSDP2's calls go through them) and,
under DDP, by a communication hook that counts each gradient bucket's all-reduce (DDP's reducer calls the process
group from C++, past any Python wrapper). Every rank runs the same collectives in the same order, so the numbers
match across ranks: a rank whose count is behind is the one the others wait for.

A daemon thread per rank (`Watchdog`) writes the record once a second to output_dir/heartbeats/rank-N.json: a
side channel that works while the collectives are stuck. A rank without progress for distributed.hang_report_s
writes its main thread's innermost line of user or launcher code there and dumps every thread's stack to its rank
log. Once every rank is without progress and some rank waits in a collective or no longer writes (stopped, dead,
its host unreachable), the lowest rank that still answers writes output_dir/hang.json and prints one line naming
the rank(s) behind, their host, pid, phase and line, and the collective the others wait in. The run then still
ends at distributed.timeout_s, as without the report.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

from launcher.config import DistributedConfig
from launcher.exits import HANG_MARKER
from launcher.library_output import rank_log

BEAT_S = 1.0  # how often a rank's heartbeat file is written
# a heartbeat this old means its process no longer runs Python (SIGSTOP, killed, its host gone): several beats missed
SILENT_AFTER_S = 5.0
HEARTBEATS = "heartbeats"  # the folder under output_dir


class Record:
    """Where this process is. Written by the training thread (and DDP's reduction callbacks) with plain attribute
    writes; read by the watchdog thread, which tolerates a torn view (a value one beat old)."""

    def __init__(self):
        self.step = 0  # the optimizer step being worked on, 1-based (0: before the first)
        self.phase = "set-up"
        self.marks = 0  # bumped by every mark: progress even when step and phase repeat (eval batches)
        self.entered = 0  # sequence number of the last collective entered
        self.left = 0  # ... and of the last one that completed
        self.collective = ""  # the name of the last one entered
        self.wait_s = 0.0  # time spent between entering collectives and their completion (stragglers' report)


RECORD = Record()


def mark(phase: str, step: int | None = None) -> None:
    """The loop's phase marker: cheap enough for every micro-step (two attribute writes)."""
    RECORD.phase = phase
    if step is not None:
        RECORD.step = step
    RECORD.marks += 1


# the collectives of torch.distributed that code calls as `dist.NAME` (the object collectives call the others from
# inside torch's own module, so each counts once)
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "all_to_all",
    "all_to_all_single",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
)


def count_collectives() -> None:
    """Wrap torch.distributed's collectives so that each one counts in RECORD (once per process; idempotent)."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "counted", False):
            _UNCOUNTED[name] = fn
            setattr(dist, name, _counted(name.replace("_", "-"), fn))


_UNCOUNTED: dict = {}  # torch.distributed's own functions, for the DDP hook (which counts its all-reduce itself)


def _counted(name: str, fn):
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        seq = _enter(name)
        started_s = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:  # an async op (async_op=True) counts as left once issued: its wait is the caller's
            _leave(seq, time.perf_counter() - started_s)

    collective.counted = True
    return collective


def _enter(name: str) -> int:
    RECORD.entered += 1
    RECORD.collective = name
    return RECORD.entered


def _leave(seq: int, waited_s: float) -> None:
    RECORD.left = max(RECORD.left, seq)
    RECORD.wait_s += waited_s


def counted_ddp_allreduce(bucket, group):
    """What DDP's built-in all-reduce of a gradient bucket does (sum, divided by the world size; torch's
    default_hooks.allreduce_hook), counted in RECORD once per bucket. The DDP backend's communication hook calls it
    (launcher.backends.ddp: DDP takes one hook, which also records each rank's own gradient norms)."""
    import torch.distributed as dist

    all_reduce = _UNCOUNTED.get("all_reduce", dist.all_reduce)  # the wrapped one would count the bucket twice
    seq, started_s = _enter("all-reduce (DDP gradients)"), time.perf_counter()
    tensor = bucket.buffer().div_(group.size())

    def done(future):
        _leave(seq, time.perf_counter() - started_s)
        future.value()  # raises a failed all-reduce's error (a timeout) in the backward, as DDP's own would
        return tensor

    return all_reduce(tensor, group=group, async_op=True).get_future().then(done)


# ---- where a thread is


_LIBRARIES = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_OWN_PACKAGE = os.path.dirname(os.path.realpath(__file__)) + os.sep


def _is_library(filename: str) -> bool:
    """Python's, torch's and the other installed packages' code, and this module's wrappers: not where a user looks."""
    if filename.startswith("<"):
        return True
    path = os.path.realpath(filename)
    if path == os.path.realpath(__file__):
        return True
    return not path.startswith(_OWN_PACKAGE) and path.startswith(_LIBRARIES)


def _shown(filename: str) -> str:
    path = os.path.realpath(filename)
    cwd = os.path.realpath(os.getcwd()) + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


def where(frame) -> tuple[str, str, list[str]]:
    """For a thread's current frame: the innermost line of code outside Python and the installed libraries
    ("file:line"), its source text, and the whole stack as "file:line in function: source" lines, outermost first."""
    stack = traceback.extract_stack(frame)
    lines = [f"{_shown(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in stack]
    for f in reversed(stack):
        if not _is_library(f.filename):
            return f"{_shown(f.filename)}:{f.lineno}", (f.line or "").strip(), lines
    last = stack[-1]
    return f"{_shown(last.filename)}:{last.lineno}", (last.line or "").strip(), lines


def all_stacks() -> str:
    """Every thread's stack, as faulthandler would print it but with the thread names."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f'Thread "{names.get(ident, ident)}" (most recent call last):\n' + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


# ---- the report


def ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5"; [3] -> "rank 3"."""
    ranks = sorted(ranks)
    spans, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(spans)}"


def compose(beats: dict[int, dict], silent: set[int]) -> str:
    """The one-line report from every rank's last heartbeat; `silent`: the ranks whose heartbeat stopped.

    The ranks behind are those that entered fewer collectives than the most any rank entered (the others wait for
    them in that collective), and the silent ones; with none behind, every rank is named with where it is."""
    most = max(b["entered"] for b in beats.values())
    behind = sorted(r for r, b in beats.items() if b["entered"] < most or r in silent)
    waiting = sorted(r for r, b in beats.items() if r not in behind and b["entered"] > b["left"])
    step = max(b["step"] for b in beats.values())
    parts = []
    for r in behind if behind else sorted(beats):
        b = beats[r]
        who = f"rank {r} (host {b['host']}, pid {b['pid']})"
        if r in silent:
            parts.append(f"{who} does not answer (stopped, dead or unreachable; last seen in {b['phase']} at step {b['step']})")
        else:
            parts.append(f"{who} is in {b['phase']} at {b['where']} ({b['call']})")
    if behind and waiting:
        by_place: dict[tuple, list[int]] = {}
        for r in waiting:
            by_place.setdefault((beats[r]["collective"], beats[r]["entered"], beats[r]["where"]), []).append(r)
        for (name, seq, place), ranks in by_place.items():
            parts.append(f"{ranks_text(ranks)} wait{'s' if len(ranks) == 1 else ''} in {name} #{seq:,} at {place}")
        for r in behind:
            parts.append(f"rank {r} entered #{beats[r]['entered']:,} only")
    return f"hang at step {step:,}: " + "; ".join(parts)


class Watchdog:
    """One per rank: the heartbeat, the stack dump of a rank without progress, and (one rank) the report."""

    def __init__(self, output_dir: Path, rank: int, world_size: int, hang_report_s: float, rank_log: Path):
        self.output_dir, self.rank, self.world_size, self.hang_report_s = output_dir, rank, world_size, hang_report_s
        self.rank_log = rank_log
        self.folder = output_dir / HEARTBEATS
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="launcher-hang-watchdog", daemon=True)

    def start(self) -> Watchdog:
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError:
            return self  # a fault of output_dir: the run's next write reports it; no report then
        self.thread.start()
        return self

    def stop(self) -> None:
        """The run ended its training: no report from here on, and this rank's heartbeat goes."""
        self.stopping.set()
        self.thread.join(timeout=5)
        (self.folder / f"rank-{self.rank}.json").unlink(missing_ok=True)
        try:
            self.folder.rmdir()  # the last rank's removal empties it
        except OSError:
            pass

    def _run(self) -> None:
        seen, progressed_s, stalled, reported = None, time.monotonic(), None, None
        while not self.stopping.wait(BEAT_S):
            record = RECORD
            now = (record.marks, record.entered, record.left)
            if now != seen:
                seen, progressed_s = now, time.monotonic()
                if reported is not None:
                    self._resolved(reported)
                stalled = reported = None
            idle_s = time.monotonic() - progressed_s
            if stalled is None and idle_s >= self.hang_report_s:
                stalled = self._stalled(idle_s)
            beat = {
                "rank": self.rank,
                "host": self.host,
                "pid": self.pid,
                "step": record.step,
                "phase": record.phase,
                "entered": record.entered,
                "left": record.left,
                "collective": record.collective,
                "idle_s": round(idle_s, 1),
                "written_at": time.time(),
                **(stalled or {}),
            }
            try:
                _write_atomically(self.folder / f"rank-{self.rank}.json", json.dumps(beat))
                if stalled is not None and reported is None:
                    reported = self._report()
            except OSError:
                pass  # output_dir unwritable: the run's own writes report it

    def _stalled(self, idle_s: float) -> dict:
        """No progress for hang_report_s: where the main thread is, and every thread's stack in the rank log."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        place, call, stack = where(frame) if frame is not None else ("?", "", [])
        try:
            with open(self.rank_log, "a") as log:
                log.write(
                    f"launcher: rank {self.rank} (pid {self.pid}) made no progress for {idle_s:.0f} s"
                    f" (distributed.hang_report_s): the stacks of its threads\n{all_stacks()}\n"
                )
        except OSError:
            pass
        return {"stalled": True, "where": place, "call": call, "stack": stack}

    def _report(self) -> dict | None:
        """Once every rank is without progress: the lowest rank that answers writes hang.json and prints the line.
        None while some rank still progresses (try again at the next beat) or another rank reports."""
        beats, silent = {}, set()
        for rank in range(self.world_size):
            try:
                beats[rank] = json.loads((self.folder / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                return None  # not written yet (or torn: the next beat reads it again)
            if time.time() - beats[rank]["written_at"] > SILENT_AFTER_S:
                silent.add(rank)
            elif not beats[rank].get("stalled"):
                return None  # that rank still progresses: no hang yet
        if min(set(beats) - silent) != self.rank:
            return {}  # another rank reports it
        if not silent and not any(b["entered"] > b["left"] for b in beats.values()):
            return None  # no rank waits in a collective (a long compile on every rank): nothing to report
        line = compose(beats, silent)
        report = {"line": line, "time": time.time(), "hang_report_s": self.hang_report_s, "silent": sorted(silent), "ranks": beats}
        path = self.output_dir / HANG_MARKER
        _write_atomically(path, json.dumps(report, indent=1) + "\n")
        print(f"launcher: {line} (every rank's stack: {path}; all threads in logs/rank-N.log)", file=sys.stderr, flush=True)
        return report

    def _resolved(self, report: dict) -> None:
        """Progress again after a report (a step longer than hang_report_s): say so, and mark hang.json."""
        if not report:
            return
        waited_s = time.time() - report["time"] + self.hang_report_s
        path = self.output_dir / HANG_MARKER
        try:
            _write_atomically(path, json.dumps({**report, "resolved_after_s": round(waited_s, 1)}, indent=1) + "\n")
        except OSError:
            pass
        print(
            f"launcher: warning: the run progresses again after {waited_s:.0f} s without progress (not a hang: a step,"
            f" evaluation or save longer than distributed.hang_report_s = {self.hang_report_s:g} s; raise it to avoid the report)",
            file=sys.stderr,
            flush=True,
        )


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def watch(model, cfg: DistributedConfig, output_dir: Path, rank: int, world_size: int) -> Watchdog | None:
    """Every rank of a multi-process run, once the model is wrapped and before its first backward: count the
    collectives (the hang and straggler reports read the counts) and start the watchdog. None for one process, or
    when hang_report_s is not below timeout_s (the timeout would end the run first)."""
    if world_size == 1:
        return None
    count_collectives()  # DDP's gradient buckets are counted by the DDP backend's hook (counted_ddp_allreduce)
    if cfg.hang_report_s >= cfg.timeout_s:
        return None

    return Watchdog(output_dir, rank, world_size, cfg.hang_report_s, rank_log(output_dir, rank)).start()


def read_report(output_dir: Path, pids: set[int]) -> dict | None:
    """The hang report of the run whose workers had `pids` (not an older run's), unless it resolved."""
    try:
        report = json.loads((output_dir / HANG_MARKER).read_text())
    except (OSError, ValueError):
        return None
    ours = {b.get("pid") for b in report.get("ranks", {}).values()} <= pids
    return report if ours and "resolved_after_s" not in report else None


def flight_recorder_lines(output_dir: Path) -> list[str]:
    """On GPUs: what NCCL's flight recorder dumped at the timeout (output_dir/logs/nccl-trace-rank-N, see
    distributed.record_flight), as one phrase per rank: its last completed NCCL collective. The dumps are torch's
    pickled dict of "entries" (collective_seq_id, profiling_name, state). Nothing when there are none (CPU runs) or
    they do not read (another torch version's format). Untested here: no GPU in CI."""
    import pickle

    lines = []
    for path in sorted(
        (output_dir / "logs").glob("nccl-trace-rank-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else 0
    ):
        try:
            entries = pickle.loads(path.read_bytes()).get("entries", [])
            done = [e for e in entries if e.get("state") == "completed"]
        except Exception:  # noqa: BLE001 - a torn or foreign dump: the report goes on without it
            continue
        rank = path.name.rsplit("-", 1)[1]
        if done:
            lines.append(f"rank {rank} last completed {done[-1].get('profiling_name', '?')} #{done[-1].get('collective_seq_id', '?')}")
        else:
            lines.append(f"rank {rank} completed no NCCL collective")
    return lines
