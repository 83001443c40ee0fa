"""The output directory: refusing to clobber a previous run, storage checks and faults, the resolved config, the final weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.config import Config, to_yaml
from launcher.errors import RunFault, UsageError
from launcher.exits import HANG_MARKER, NONFINITE_MARKER, PREEMPTED_MARKER
from launcher.final import FINAL, WEIGHTS
from launcher.formatting import bytes_text
from launcher.hang import HEARTBEATS
from launcher.lock import LOCK_FILE

# --overwrite removes only these
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    FINAL,
    "checkpoints",
    "tensorboard",
    "plots",
    "logs",
    PREEMPTED_MARKER,
    NONFINITE_MARKER,
    HANG_MARKER,
    HEARTBEATS,
)
RUN_FILES += ("trackers.json", "wandb", "mlflow.db")  # launcher.trackers: a new run in this output_dir gets new tracker runs
RUN_FILES += ("samples.jsonl",)  # eval.generate (launcher.generate)


def cleared_by_overwrite(output_dir: Path, path: Path) -> str | None:
    """The entry of RUN_FILES whose removal by --overwrite would delete `path` (symlinks followed), or None."""
    target = path.resolve()
    for name in RUN_FILES:
        removed = (output_dir / name).resolve()
        if target == removed or removed in target.parents:
            return name
    return None


def holds_files(output_dir: Path) -> bool:
    """output_dir exists and holds something besides a lock file (or one being taken over or handed over)."""
    return output_dir.is_dir() and any(not p.name.startswith(LOCK_FILE) for p in output_dir.iterdir())


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output_dir unless --overwrite (checked before anything is written)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output_dir: '{output_dir}' is a file; set output_dir to a directory path")
    if holds_files(output_dir) and not overwrite:
        raise UsageError(
            f"output_dir: '{output_dir}' already exists and is not empty; pass --overwrite to replace its run, or set output_dir=NEW_DIR"
        )


def prepare_output_dir(cfg: Config, clear: bool, resume_step: int | None) -> None:
    """Main process only: clear a previous run's files (`clear`: --overwrite with nothing resumed from them), keep a
    resumed run's metrics up to its checkpoint (later rows will be logged again), and write the resolved config."""
    out = cfg.output_dir
    if clear:
        for name in RUN_FILES:
            _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / PREEMPTED_MARKER).unlink(missing_ok=True)
    (out / NONFINITE_MARKER).unlink(missing_ok=True)
    (out / HANG_MARKER).unlink(missing_ok=True)  # an earlier run's: this run's exit code must not read it
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        kept = metrics_until(metrics, resume_step) if resume_step is not None else ""
        _replace(metrics, kept)
    _replace(out / "config.yaml", to_yaml(cfg))


def _remove(target: Path) -> None:
    """Delete a previous run's file or folder. A folder that is a symbolic link (checkpoints/ put on another disk)
    keeps the link, so the new run's files go where the user sent them, and loses its contents."""
    if target.is_symlink() and target.is_dir():
        for child in target.iterdir():
            _remove(child)
    elif target.is_dir():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def metrics_until(path: Path, step: int) -> str:
    """The rows of metrics.jsonl up to `step`. A line that does not parse (the last one, torn by a crash or a full
    disk in the middle of a write) ends the rows kept."""
    kept = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("step", step + 1) > step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    return "".join(kept)


def _replace(path: Path, text: str) -> None:
    """Write a file whole or not at all: a fault halfway leaves the previous content."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "an I/O error",
}


def storage_fault(err: BaseException, folder: Path, what: str, name: str = "output_dir") -> RunFault | None:
    """A failed write into `folder` caused by the machine (no space, read-only, the folder gone): RunFault with one
    line; None for anything else (a bug, which keeps its traceback). torch's and safetensors' writers report a full
    disk without an errno, so the file system is looked at when the error has none."""
    code = getattr(err, "errno", None)
    if code is None or code not in FAULTS and code != errno.ENOENT:
        code = _probe(folder)
    advice = "the newest complete checkpoint is kept; fix it and run again with resume=auto"
    if code == errno.ENOENT or not folder.is_dir():
        return RunFault(f"{what}: {name} '{folder}' vanished (deleted, moved or unmounted) during the run; {advice}")
    if code in FAULTS:
        return RunFault(f"{what}: {FAULTS[code]} in {name} '{folder}' ({free_text(folder)}); {advice}")
    return None


def _probe(output_dir: Path) -> int | None:
    """The errno a write into output_dir would meet now, if any."""
    if not output_dir.is_dir():
        return errno.ENOENT
    if free_bytes(output_dir) < 1 << 20:
        return errno.ENOSPC
    if not os.access(output_dir, os.W_OK | os.X_OK):
        return errno.EROFS if os.statvfs(output_dir).f_flag & os.ST_RDONLY else errno.EACCES
    return None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def free_text(path: Path) -> str:
    try:
        return f"{bytes_text(free_bytes(path))} free"
    except OSError:
        return "free space unknown"


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_storage(output_dir: Path, checkpoint_bytes: int, cache_dirs: list[tuple[str, Path]]) -> None:
    """Before the model is built: output_dir (or the folder it will be made in) and the caches are writable, and
    the file system has room for one more checkpoint. RunFault (exit code 74) naming the folder otherwise."""
    for what, folder in [("output_dir", output_dir), *cache_dirs]:
        where = existing_parent(folder)
        if not where.is_dir():  # bad input (a path under a regular file), not a fault of the machine
            raise UsageError(f"{what}: '{folder}' lies under '{where}', which is a file; set {what} to a path under a folder")
        if not os.access(where, os.W_OK | os.X_OK):
            why = "read-only file system" if os.statvfs(where).f_flag & os.ST_RDONLY else "permission denied"
            raise RunFault(f"{what}: '{folder}' cannot be written ({why} at '{where}'); make it writable or set {what} to another folder")
    where = existing_parent(output_dir)
    if free_bytes(where) < checkpoint_bytes:
        raise RunFault(
            f"output_dir: a checkpoint of this run needs about {bytes_text(checkpoint_bytes)} and '{where}' has"
            f" {free_text(where)}; free space there or set output_dir to another file system"
        )


def save_weights(state_dict: dict[str, torch.Tensor], directory: Path) -> Path:
    """Full, unwrapped weights as safetensors (final/ of the built-in GPT: launcher.final). Main process only."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    path = directory / WEIGHTS
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
