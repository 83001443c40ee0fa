"""Checkpoints: written atomically, rotated, found and loaded to resume exactly.

A checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNNNNN/`: Accelerate's state (model, optimizer,
grad scaler, every rank's RNG states, the LR schedule) plus `trainer_state.json` (the step, which
is also the data position, and what a resume must agree with) and the resolved config. It is written under a temporary
name and renamed once every rank's files are on disk and flushed, so a crash or `kill -9` during a
save never leaves a checkpoint that looks complete and cannot load. Older ones are deleted only
after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from launcher.errors import UsageError

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"step-(\d{9})")


@dataclass
class TrainerState:
    step: int  # optimizer steps done; also the data position (batches.py derives the samples from it)
    epoch: int  # the epoch the next step belongs to (step // steps per epoch)
    skipped_steps: int  # fp16 overflow steps among them
    global_batch_size: int
    world_size: int
    backend: str
    nonfinite_steps: int = 0  # steps dropped by diagnostics.nonfinite: skip


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of unfinished saves are not among them."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `auto` takes the newest complete one (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"resume: checkpoint '{path}' does not exist; give a folder under {checkpoint_root(output_dir)}/ or resume=auto")
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"resume: '{path}' is not a complete checkpoint (no {STATE_FILE}); give a complete one or resume=auto")
    return path


def read_state(path: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"resume: '{path / STATE_FILE}' is unreadable ({err}); resume from another checkpoint") from None


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(acc: Accelerator, output_dir: Path, state: TrainerState, config_yaml: str, keep_last: int | None) -> Path:
    """Every rank calls this at the same optimizer-step boundary; returns the complete checkpoint.

    `config_yaml` is the run's resolved config, kept beside the state it produced."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:09d}"
    partial = root / f".partial-{final.name}"
    if acc.is_main_process:
        if partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    acc.wait_for_everyone()  # every rank's files (its RNG states, DeepSpeed shards) are written
    if acc.is_main_process:
        (partial / "config.yaml").write_text(config_yaml)
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        _fsync_tree(partial)
        if final.exists():  # the same step saved before (a resumed run that stops where it resumed)
            shutil.rmtree(final)
        os.rename(partial, final)  # the commit point: atomic on one filesystem
        _fsync_tree(root)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc: Accelerator, path: Path, global_batch_size: int) -> TrainerState:
    """Restore the run from `path`; UsageError (one line, nothing deleted) when it cannot be resumed."""
    state = read_state(path)
    if state.global_batch_size != global_batch_size:
        raise UsageError(
            f"resume: '{path}' was trained with a global batch of {state.global_batch_size}, this run has {global_batch_size};"
            f" set train.gradient_accumulation_steps (or micro_batch_size) so that the global batch is {state.global_batch_size}"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED and state.world_size != acc.num_processes:
        raise UsageError(
            f"resume: '{path}' holds DeepSpeed shards of {state.world_size} ranks, this run has {acc.num_processes};"
            f" resume it with {state.world_size} processes"
        )
    try:
        acc.load_state(str(path))
    except Exception as err:  # torch, safetensors and DeepSpeed raise many types for a bad file
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err) or "shape" in str(err):
            raise UsageError(f"resume: '{path}' was written by a model of a different shape ({reason}); resume with its config") from None
        raise UsageError(f"resume: '{path}' cannot be loaded ({type(err).__name__}: {reason}); resume from another checkpoint") from None
    return state
