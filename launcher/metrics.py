"""metrics.jsonl and the progress bar, both on the main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per line (and, with `tensorboard_dir`, TensorBoard scalars); a no-op off the main process."""

    def __init__(self, path: Path, is_main_process: bool, total_steps: int, start_step: int = 0,
                 tensorboard_dir: Path | None = None):
        self.is_main_process = is_main_process
        self.path = path
        self.fault: OSError | None = None  # a failed write (full disk, output_dir gone): the loop stops every rank on it
        self.file = path.open("a") if is_main_process else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not is_main_process)
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
        if self.tensorboard is not None:
            for tag, value in _scalars(row):
                self.tensorboard.add_scalar(tag, value, global_step=row["step"])
        shown = {k: row[k] for k in ("loss", "eval_loss", "grad_norm", "lr") if k in row}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

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


def close_progress_bars() -> None:
    """End any progress bar's line, so that an error printed next stands on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def _scalars(row: dict, prefix: str = ""):
    """(tag, number) pairs of a metrics row; nested rows (per-layer norms, gradient statistics) as tag/sub/..."""
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
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
