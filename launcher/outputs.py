"""The output directory: refusing to clobber a previous run, the resolved config, the final weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.config import Config, to_yaml
from launcher.errors import UsageError

PREEMPTED_MARKER = "preempted.json"  # written when a run stops for preemption; removed when the next one starts
NONFINITE_MARKER = "nonfinite.json"  # written when a run stops on an inf/nan; removed when the next one starts
# --overwrite removes only these
RUN_FILES = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "tensorboard", "plots", PREEMPTED_MARKER, NONFINITE_MARKER)


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse an existing non-empty output_dir unless --overwrite or resuming (checked before anything is written)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output_dir: '{output_dir}' is a file; set output_dir to a directory path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite and not resuming:
        raise UsageError(
            f"output_dir: '{output_dir}' already exists and is not empty; pass --overwrite to replace its run, or set output_dir=NEW_DIR"
        )


def prepare_output_dir(cfg: Config, overwrite: bool, resume_step: int | None) -> None:
    """Main process only: clear a previous run's files (with --overwrite), keep a resumed run's metrics up to
    its checkpoint (later rows will be logged again), and write the resolved config."""
    out = cfg.output_dir
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / PREEMPTED_MARKER).unlink(missing_ok=True)
    (out / NONFINITE_MARKER).unlink(missing_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True) if resume_step is not None else []
        metrics.write_text("".join(line for line in lines if json.loads(line)["step"] <= resume_step))
    (out / "config.yaml").write_text(to_yaml(cfg))


def save_weights(state_dict: dict[str, torch.Tensor], cfg: Config, directory: Path) -> Path:
    """Full, unwrapped weights as safetensors, plus the config that builds the model. Main process only."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    path = directory / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    (directory / "config.yaml").write_text(to_yaml(cfg))
    return path


def mark_preempted(output_dir: Path, step: int) -> Path:
    """Main process, after a preemption checkpoint: tell the job script (and a relaunching parent) to requeue."""
    checkpoint = output_dir / "checkpoints" / f"step-{step:09d}"
    (output_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "checkpoint": str(checkpoint)}) + "\n")
    return checkpoint
