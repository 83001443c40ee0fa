"""One run per output_dir: `OUTPUT_DIR/run.lock`, held by the main process while a run trains.

The lock file names its holder (host, pid, the process's start time, the SLURM job). A second run
on the same output_dir is refused while the holder lives. A lock whose holder is gone (a run killed
with SIGKILL, a crashed node) is stale: a process on the same host takes it over when the holder's
pid is dead (or reused by another process), and a requeued SLURM job takes over the lock of its own
earlier incarnation; both with a warning. A lock held on another host by another job cannot be
checked from here and is refused, with the file to delete if that run is gone. Multi-node runs hold
one lock: only the global main process takes it.

The lock is taken before anything touches output_dir, and where the run starts (fresh, resumed, refused) is
decided under it: by the pre-flight of a plain `launcher train`, or, under an external launcher, by the main
process as soon as the process group exists. A plain multi-process run hands its lock to its workers' main
process (HANDOVER, the parent's record): that process rewrites the lock as its own, so the output_dir is held
without a gap from the pre-flight to the end, and by a living process while the workers save.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from launcher.errors import UsageError

LOCK_FILE = "run.lock"
HANDOVER = "LAUNCHER_LOCK_HANDOVER"  # the lock record a plain `launcher train` hands to its workers' main process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid apart from a later process with the same pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_time": _start_time(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_holder(output_dir: Path) -> dict | None:
    """The holder recorded in the lock file; an unreadable one (torn by a crash) counts as {} (a stale lock)."""
    try:
        holder = json.loads((output_dir / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def handed_to_me(holder: dict) -> bool:
    """`holder` is the lock the `launcher train` that started this process handed over to it."""
    try:
        return bool(holder) and json.loads(os.environ.get(HANDOVER, "null")) == holder
    except ValueError:
        return False


def holder_state(holder: dict) -> str:
    """'alive', 'stale' or 'unknown' (on another host: its processes cannot be seen from here)."""
    me = _me()
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return "stale"  # this very process built a run on output_dir before (a library caller): its own lock
    if not holder or (holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]):
        return "stale"  # torn, or an earlier incarnation of this requeued SLURM job (SLURM ran it to its end first)
    if holder.get("host") != me["host"]:
        return "unknown"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "stale"
    started = _start_time(pid)
    return "alive" if started is not None and started == holder.get("start_time") else "stale"


def describe(holder: dict) -> str:
    return f"a run on {holder.get('host', '?')} (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"


def check_not_held(output_dir: Path) -> None:
    """Refuse an output_dir that a live run holds (before anything is built); a stale lock is left for acquire()."""
    holder = read_holder(output_dir)
    if holder is None or handed_to_me(holder):
        return
    state = holder_state(holder)
    if state == "alive":
        raise UsageError(f"output_dir: '{output_dir}' is in use by {describe(holder)}; wait for it to end, or set output_dir=NEW_DIR")
    if state == "unknown":
        raise UsageError(
            f"output_dir: '{output_dir}' is locked by {describe(holder)}, which cannot be checked from this host;"
            f" if that run has ended, delete {output_dir / LOCK_FILE}"
        )


class OutputLock:
    """The lock of one run on its output_dir; the main process holds it from before the first write to the end."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self.record = _me()
        self.taken_over: dict | None = None  # the stale holder this run replaced, for the warning
        self.created: list[Path] = []  # the folders acquire() made (output_dir and missing parents), deepest first
        self.handed_over = False  # taken over from the `launcher train` that started this process (its pre-flight's)

    def acquire(self) -> OutputLock:
        """Create the lock atomically; take over a stale one, or the one handed over by this process's `launcher
        train`; UsageError if a live run holds it."""
        folder = self.path.parent.absolute()
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self.created = [p for p in missing if p.is_dir()]
        for _ in range(3):  # a race with another run taking over the same stale lock: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.path.parent)
                if holder is None:
                    continue
                if handed_to_me(holder):  # atomic: the file names the parent or this process, never neither
                    own = self.path.with_name(f"{LOCK_FILE}.handover-{os.getpid()}")
                    own.write_text(json.dumps(self.record) + "\n")
                    os.replace(own, self.path)
                    self.handed_over = True
                    return self
                check_not_held(self.path.parent) if holder_state(holder) != "stale" else None
                stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, stale)  # only one of two runs taking it over wins this rename
                except FileNotFoundError:
                    continue
                stale.unlink()
                self.taken_over = holder if holder.get("pid") != os.getpid() else None
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record) + "\n")
            return self
        raise UsageError(f"output_dir: '{self.path.parent}' is being taken by another run; wait for it, or set output_dir=NEW_DIR")

    def held(self) -> bool:
        """The lock file is still there and ours (false when output_dir was deleted or unmounted under the run)."""
        return read_holder(self.path.parent) == self.record

    def release(self) -> None:
        """Remove the lock if it is still ours, and the folders acquire() made if they stayed empty (a refused run
        leaves the disk as it found it)."""
        try:
            if self.held():
                self.path.unlink()
            for folder in self.created:
                folder.rmdir()
        except OSError:
            pass  # output_dir gone, read-only or holding files: nothing more to remove
