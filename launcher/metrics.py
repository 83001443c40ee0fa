"""metrics.jsonl and the progress output, both on the main process only.

Progress goes where it suits: a tqdm bar on stderr when stderr is a terminal; one plain line per metrics
row on stdout when stdout is not a terminal (a SLURM log, a pipe) or there is no bar, so a log file gets
readable lines instead of carriage-return frames.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from launcher.formatting import duration_text, number_text


class MetricsLog:
    """Appends one JSON object per line (and, with `tensorboard_dir`, TensorBoard scalars); a no-op off the main process."""

    def __init__(
        self,
        path: Path,
        is_main_process: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard_dir: Path | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        trackers=None,  # launcher.trackers.Trackers (which imports this module for `scalars`)
    ):
        self.total_steps = total_steps
        self.path = path
        self.fault: OSError | None = None  # a failed write (full disk, output_dir gone): the loop stops every rank on it
        self.file = path.open("a") if is_main_process else None
        out, err = out or sys.stdout, err or sys.stderr
        show_bar = is_main_process and err.isatty()
        self.lines = out if is_main_process and (not out.isatty() or not show_bar) else None
        self.started_s = time.monotonic()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not show_bar, file=err)
        self.trackers = trackers  # W&B, MLflow (launcher.trackers): each row is queued for them, never waited on
        self.tensorboard = None
        if tensorboard_dir is not None and is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the events a stopped one logged after its checkpoint, as metrics.jsonl drops them
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        if self.file is None or self.fault is not None:
            return
        try:
            self.file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
            self.file.flush()
        except OSError as err:  # a torn last line may remain: a resume cuts metrics.jsonl back to its checkpoint
            self.fault = err
            return
        if self.trackers is not None:
            self.trackers.log(row)
        if self.tensorboard is not None:
            for tag, value in scalars(row):
                self.tensorboard.add_scalar(tag, value, global_step=row["step"])
        if self.lines is not None and ("loss" in row or "eval_loss" in row):
            print(self.progress_line(row), file=self.lines, flush=True)
        shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "grad_norm", "lr") if k in row}
        if "mfu" in row:
            shown["mfu"] = f"{100 * row['mfu']:.1f}%"
        if "max_memory_allocated_gb" in row:
            shown["mem"] = f"{row['max_memory_allocated_gb']:.1f}G"
        self.bar.set_postfix(shown, refresh=False)

    def progress_line(self, row: dict) -> str:
        """One metrics row as a line for a log file: step, loss, lr, grad norm, throughput, mfu and memory when known."""
        step = f"step {row['step']}/{self.total_steps}"
        if "eval_loss" in row:
            return f"{step} | eval_loss {number_text(row['eval_loss'], '.4f')} on {row['eval_tokens']:,} tokens"
        parts = [
            step,
            f"loss {number_text(row['loss'], '.4f')}",
            f"lr {row['lr']:.3e}",
            f"grad_norm {number_text(row['grad_norm'], '.4g')}",
            f"{row['tokens_per_s']:,.0f} tokens/s",
        ]
        if "mfu" in row:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        if "max_memory_allocated_gb" in row:
            parts.append(f"mem {row['max_memory_allocated_gb']:.2f} GiB (reserved {row['max_memory_reserved_gb']:.2f})")
        elapsed_s = time.monotonic() - self.started_s
        left_s = (self.total_steps - row["step"]) * row["s_per_step"]
        parts.append(f"elapsed {duration_text(elapsed_s)}, left ~{duration_text(left_s)}")
        return " | ".join(parts)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the flush of a full disk: already recorded as the run's fault
                pass
        if self.tensorboard is not None:
            self.tensorboard.close()


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak GPU memory since the last call, in GiB (2^30 bytes), then the peak is reset; nothing on CPU.

    The caching allocator keeps these counters on the host: reading and resetting them waits for no kernel.
    """
    if device.type != "cuda":
        return {}
    row = {
        "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "max_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return row


def close_progress_bars() -> None:
    """End any progress bar's line, so that an error printed next stands on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def scalars(row: dict, prefix: str = ""):
    """(tag, number) pairs of a metrics row; nested rows (per-layer norms, gradient statistics) as tag/sub/..."""
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _plain(value):
    """JSON has no inf or nan: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line torn by a crash (or still being written) is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return rows
