"""How a run ends: every exit code of `launcher`, the marker files an ended run leaves, and the one function
(`end_run`) that turns a run's outcome into markers, a requeue and the exit code.

0   the run finished (or was already finished)
2   bad input (config, data, checkpoint, a busy output_dir): one line each, nothing on disk changed
3   stopped on an inf/nan loss or gradient (diagnostics.nonfinite: stop); the newest checkpoint is good
74  a fault of the machine, not of the input (no space left, a read-only or vanished output_dir, an
    unwritable cache): one line; the newest complete checkpoint is kept, resume=auto continues
75  stopped on purpose (SIGTERM, SIGUSR1, SIGHUP, a first Ctrl-C) after a checkpoint, or before training
    when the signal came during the pre-flight: run again to continue
76  a rank was lost: killed by a signal (kill -9, the OOM killer) or stopped responding for
    distributed.timeout_s (SIGSTOP, a hang); the others were stopped; one line names the rank (a plain
    multi-process `launcher train`); the newest complete checkpoint is kept, resume=auto continues
77  a hang: no rank made progress for distributed.hang_report_s while some waited in a collective; the hang
    report (output_dir/hang.json, one line on the console) names the rank behind, its host and line; the run
    was ended at distributed.timeout_s (a plain multi-process `launcher train`); resume=auto continues
130 a second Ctrl-C: stopped at once, without a checkpoint
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import RunFault
from launcher.slurm import report_stop

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_FAULT = 74  # sysexits' EX_IOERR
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped early on purpose, run it again to continue
EXIT_RANK_LOST = 76  # the launcher's own (sysexits' EX_PROTOCOL means nothing here)
EXIT_HUNG = 77  # the launcher's own (sysexits' EX_NOPERM means nothing here)
EXIT_ABORTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

# beside the run in output_dir; both are removed when the next run in that folder starts
PREEMPTED_MARKER = "preempted.json"  # where a stop by signal left its checkpoint, and whether it asks for a requeue
NONFINITE_MARKER = "nonfinite.json"  # the inf/nan report of a run stopped on one
HANG_MARKER = "hang.json"  # the hang report (launcher.hang): which rank the others waited for, and every rank's stack


@dataclass
class RunOutcome:
    """How a trained run ended (launcher.loop.train's answer), as every rank knows it."""

    steps: int  # optimizer steps done, this run and the ones it resumed
    skipped_steps: int  # fp16 overflow steps among them (the scaler's, or DeepSpeed's overflow check)
    nonfinite_steps: int  # steps dropped for an inf/nan loss or gradient (diagnostics.nonfinite: skip)
    nonfinite: list[str] | None  # the report, when the run stopped on an inf/nan (diagnostics.nonfinite: stop)
    preempted: bool  # stopped by a signal after a checkpoint
    requeue: bool  # ... and asked for a requeue (the requeue signal only)
    checkpoint: Path | None  # the newest checkpoint this run saved
    weights: Path | None = None  # final/, once written
    first_eval_loss: float | None = None  # at step 0 (eval.at_start)
    eval_loss: float | None = None  # the final evaluation's

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.preempted else EXIT_NONFINITE if self.nonfinite else EXIT_OK


def end_run(outcome: RunOutcome, output_dir: Path, is_main_process: bool, release_lock: Callable[[], None] | None = None) -> int:
    """A trained run's outcome (`launcher.loop.train`'s answer) as marker files, a requeue and the exit code.

    Every rank calls it; the main process writes the marker (under the output_dir lock), then the lock is
    released (a requeued job's next incarnation must find output_dir free), then, after a stop by signal
    inside a SLURM job, the job script is told or the job requeued: only now, the stop checkpoint complete."""
    code = outcome.exit_code
    try:
        if is_main_process and code == EXIT_PREEMPTED:
            _write_marker(output_dir / PREEMPTED_MARKER, {"step": outcome.steps, "checkpoint": str(outcome.checkpoint), "requeue": outcome.requeue})
        if is_main_process and code == EXIT_NONFINITE:
            _write_marker(output_dir / NONFINITE_MARKER, {"report": outcome.nonfinite})
            for line in outcome.nonfinite:
                print(f"launcher: error: {line}", file=sys.stderr)
    finally:
        if release_lock is not None:
            release_lock()
    if is_main_process and code == EXIT_PREEMPTED:
        report_stop(output_dir, outcome.steps, outcome.requeue)
    return code


def end_with_error(err: Exception, quiet: bool = False) -> int:
    """A run (or command) ended by bad input (UsageError: EXIT_USAGE) or a fault of the machine (RunFault:
    EXIT_FAULT): one `launcher: error:` line per problem on stderr unless `quiet` (another rank reports it)."""

    if not quiet:
        for line in err.lines:
            print(f"launcher: error: {line}", file=sys.stderr)
    return EXIT_FAULT if isinstance(err, RunFault) else EXIT_USAGE


def _write_marker(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n")
