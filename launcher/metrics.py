"""metrics.jsonl and the progress bar, both on the main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per line; a no-op off the main process."""

    def __init__(self, path: Path, is_main_process: bool, total_steps: int, start_step: int = 0):
        self.is_main_process = is_main_process
        self.file = path.open("a") if is_main_process else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not is_main_process)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
        self.file.flush()
        shown = {k: row[k] for k in ("loss", "eval_loss", "grad_norm", "lr") if k in row}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _plain(value):
    """JSON has no inf or nan: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
