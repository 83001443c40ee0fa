"""Under torchrun (or alone): train, and record this rank's bytes of parameters, gradients (when the first optimizer
step starts) and AdamW moments (after it), counted as the storage really allocated (shared storage once).

Usage: measure_memory.py CONFIG RESULT_JSON [key=value ...]
"""

import json
import sys

import torch

from launcher.build import build_run
from launcher.config import load_config
from launcher.distributed import end_process
from launcher.loop import train

config_path, result_path, *overrides = sys.argv[1:]
run = build_run(load_config(config_path, overrides), overwrite=True)
measured = {}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def allocated(tensors) -> int:
    storages = {}
    for t in tensors:
        storage = local(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def before_step(optimizer, args, kwargs):
    if "parameters" not in measured:
        params = list(run.model.parameters())
        measured["parameters"] = allocated(params)
        measured["gradients"] = allocated(p.grad for p in params if p.grad is not None)


def after_step(optimizer, args, kwargs):
    if "optimizer" not in measured:
        measured["optimizer"] = allocated(state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))


run.optimizer.optimizer.register_step_pre_hook(before_step)
run.optimizer.optimizer.register_step_post_hook(after_step)
train(run)
with open(f"{result_path}.rank{run.accelerator.process_index}", "w") as f:
    json.dump(measured, f)
sys.exit(end_process(0))
