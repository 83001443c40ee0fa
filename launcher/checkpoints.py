"""Checkpoints: written atomically, rotated, found and loaded to resume exactly.

A checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNNNNN/`: Accelerate's state (model, optimizer,
grad scaler, every rank's RNG states, the LR schedule) plus `trainer_state.json` (the step, which
is also the data position, and what a resume must agree with) and the resolved config. It is written under a temporary
name and renamed once every rank's files are on disk and flushed, so a crash or `kill -9` during a
save never leaves a checkpoint that looks complete and cannot load. Older ones are deleted only
after the new one is complete. `trainer_state.json` also lists every file of the checkpoint with its
size (every rank's RNG states included), so a checkpoint that lost or truncated a file is refused
before anything is built, instead of resuming inexactly; and with its CRC-32, so that one whose bytes changed
at the same size (a bad disk, a torn copy) is refused at the resume's pre-flight, which reads it whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from launcher.distributed import first_failed_rank
from launcher.errors import RunFault, UsageError

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"step-(\d{9})")


@dataclass
class TrainerState:
    step: int  # optimizer steps done; also the data position (batches.py derives the samples from it)
    epoch: int  # the epoch the next step belongs to (step // steps per epoch)
    skipped_steps: int  # fp16 overflow steps among them
    global_batch_size: int
    world_size: int
    backend: str  # the backend's name for people, e.g. "DeepSpeed ZeRO-2"
    nonfinite_steps: int = 0  # steps dropped by diagnostics.nonfinite: skip
    files: dict[str, int] = field(default_factory=dict)  # every file of the checkpoint (relative path) and its size in bytes
    crc32: dict[str, str] = field(default_factory=dict)  # every file's CRC-32 (hex), checked by a resume's pre-flight
    data: dict[str, dict] = field(default_factory=dict)  # the identity of data.path / data.eval_path (launcher.data.identity)
    train_samples: int | None = None  # the run's training samples: another number on resume means other data
    backend_kind: str | None = None  # launcher.backends.BackendKind; None in checkpoints written before it was recorded
    trackers: dict[str, str] = field(default_factory=dict)  # tracker name: its run id (launcher.trackers), so a resume continues it
    sample_order: str | None = None  # launcher.batches.ORDER_KINDS; None in checkpoints written before it was recorded: "array"


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
    """The checkpoint to resume from, verified complete: `auto` takes the newest one (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        if found:
            verify_checkpoint(found[-1])
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"resume: checkpoint '{path}' does not exist; give a folder under {checkpoint_root(output_dir)}/ or resume=auto")
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"resume: '{path}' is not a complete checkpoint (no {STATE_FILE}); give a complete one or resume=auto")
    verify_checkpoint(path)
    return path


def read_state(path: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"resume: '{path / STATE_FILE}' is unreadable ({err}); resume from another checkpoint") from None


def file_crc32(path: Path) -> str:
    """The file's CRC-32: it detects changed bytes, not a forger, at 2-4 GB/s per core, twice sha256's speed (measured
    by benchmarks/checkpoint_checksums.py). zlib releases the GIL, so files are checked on several threads."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """The CRC-32 of each named file of `folder`, on up to 8 threads (a large checkpoint has several large files)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(file_crc32, [folder / name for name in names])))


def verify_checkpoint(path: Path, contents: bool = False) -> TrainerState:
    """Every file the checkpoint was written with is there, at its size, and with `contents` (a resume's pre-flight:
    it reads the whole checkpoint) at its CRC-32; UsageError (one line, nothing deleted) if not.

    Checkpoints written before the file list existed are checked for every rank's RNG states (Accelerate
    resumes without a word when one is missing, and the run is then not exact)."""
    state = read_state(path)
    expected = state.files or {f"random_states_{rank}.pkl": None for rank in range(state.world_size)}
    for name, size in sorted(expected.items()):
        found = path / name
        if not found.is_file():
            what = f"rank {name[14:-4]}'s RNG state" if name.startswith("random_states_") else name
            raise UsageError(
                f"resume: checkpoint '{path}' is incomplete: {what} ({name}) is missing; resume from another checkpoint"
                f" (resume=PATH) or restore the file"
            )
        if size is not None and found.stat().st_size != size:
            raise UsageError(
                f"resume: checkpoint '{path}' cannot be loaded: {name} has {found.stat().st_size} bytes, {size} were"
                f" written; resume from another checkpoint (resume=PATH)"
            )
    for name, crc in sorted(checksums(path, sorted(state.crc32)).items()) if contents else ():
        if crc != state.crc32[name]:
            earlier = max(
                (p for p in path.parent.iterdir() if NAME.fullmatch(p.name) and p.name < path.name and (p / STATE_FILE).is_file()), default=None
            )
            fix = (
                f"resume from an earlier checkpoint (resume={earlier})"
                if earlier
                else "restore the file from a copy, or train anew with output_dir=NEW_DIR"
            )
            raise UsageError(
                f"resume: checkpoint '{path}' is corrupt: {name} has other bytes than were written (CRC-32 {crc}, written"
                f" {state.crc32[name]}; same size); {fix}"
            )
    return state


def set_aside_newer(output_dir: Path, step: int) -> Path | None:
    """Resuming from an older checkpoint starts a new branch: the complete checkpoints after `step` (the
    branch left behind) move to `checkpoints/branch-N/`, where rotation and resume=auto no longer see
    them and nothing deletes them. Main process, before the new branch's first checkpoint."""
    newer = [p for p in complete_checkpoints(output_dir) if int(NAME.fullmatch(p.name).group(1)) > step]
    if not newer:
        return None
    root = checkpoint_root(output_dir)
    n = 1
    while (root / f"branch-{n}").exists():
        n += 1
    (root / f"branch-{n}").mkdir()
    for path in newer:
        os.rename(path, root / f"branch-{n}" / path.name)
    return root / f"branch-{n}"


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    acc: Accelerator,
    backend,
    output_dir: Path,
    state: TrainerState,
    config_yaml: str,
    keep_last: int | None,
    storage_fault=lambda err: None,
    pending: BaseException | None = None,
) -> Path:
    """Every rank calls this at the same optimizer-step boundary; returns the complete checkpoint.

    `config_yaml` is the run's resolved config, kept beside the state it produced. When a write fails on
    any rank, every rank stops here together: the partial folder is removed (a full disk gets its space
    back), the newest complete checkpoint is untouched, and RunFault is raised on every rank (printed by
    the first rank that failed). `storage_fault(err)` turns an error into that RunFault, or None for a bug.
    `pending`: a write of this step that already failed on this rank (a metrics row): no checkpoint without it."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:09d}"
    partial = root / f".partial-{final.name}"

    def stage(write) -> None:  # a write on this rank, then a barrier that tells every rank whether any failed
        error = None
        try:
            write()
        except Exception as err:  # noqa: BLE001 - sorted below: a fault of the machine, or a bug (re-raised)
            error = err
        failed = first_failed_rank(acc, error is not None)
        if failed is None:
            return
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if error is not None:
            fault = storage_fault(error)
            if fault is None:
                raise error
            fault.quiet = acc.process_index != failed  # several ranks may fail (a full disk): the first one reports
            raise fault
        raise RunFault(f"checkpoint: saving step {state.step} failed on rank {failed}", quiet=True)

    def start() -> None:
        if pending is not None:
            raise pending
        root.mkdir(exist_ok=True)  # not parents=True: an output_dir deleted under the run must not be recreated here
        if partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)
        partial.mkdir()

    stage(start if acc.is_main_process or pending is not None else lambda: None)
    stage(lambda: backend.save_state(partial))  # every rank's files (its RNG states, its shards)
    crc32 = {}

    def checksum_share() -> None:  # every rank's files are on the shared output_dir now: each rank reads a share of them
        names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        crc32.update(checksums(partial, names[acc.process_index :: acc.num_processes]))

    stage(checksum_share)
    for share in gather_object([crc32]) if acc.num_processes > 1 else ():
        crc32.update(share)

    def commit() -> None:
        (partial / "config.yaml").write_text(config_yaml)
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        missing = [name for name in files if name not in crc32]  # config.yaml; a file another rank did not list
        sums = {**crc32, **checksums(partial, missing)}
        (partial / STATE_FILE).write_text(json.dumps({**asdict(state), "files": files, "crc32": {n: sums[n] for n in files}}, indent=1))
        _fsync_tree(partial)
        if final.exists():  # the same step saved before (a resumed run that stops where it resumed)
            shutil.rmtree(final)
        os.rename(partial, final)  # the commit point: atomic on one filesystem
        _fsync_tree(root)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(old)

    stage(commit if acc.is_main_process else lambda: None)
    return final


def load_checkpoint(backend, path: Path, global_batch_size: int) -> TrainerState:
    """Restore the run from `path` through the run's backend (launcher.backends); UsageError (one line, nothing
    deleted) when it cannot be resumed."""
    state = read_state(path)
    if state.global_batch_size != global_batch_size:
        raise UsageError(
            f"resume: '{path}' was trained with a global batch of {state.global_batch_size}, this run has {global_batch_size};"
            f" set train.gradient_accumulation_steps (or micro_batch_size) so that the global batch is {state.global_batch_size}"
        )
    problem = backend.resume_problem(path, state)
    if problem:
        raise UsageError(problem)
    try:
        backend.load_state(path)
    except Exception as err:  # torch, safetensors and DeepSpeed raise many types for a bad file
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err) or "shape" in str(err):
            raise UsageError(f"resume: '{path}' was written by a model of a different shape ({reason}); resume with its config") from None
        raise UsageError(f"resume: '{path}' cannot be loaded ({type(err).__name__}: {reason}); resume from another checkpoint") from None
    return state
