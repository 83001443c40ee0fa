"""Under torchrun: train with a DDP comm hook that records at which micro-step each gradient all-reduce runs.

Usage: count_allreduce.py CONFIG RESULT_JSON [key=value ...]
"""

import json
import sys

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from launcher.build import build_run
from launcher.config import load_config
from launcher.distributed import end_process
from launcher.loop import train

config_path, result_path, *overrides = sys.argv[1:]
run = build_run(load_config(config_path, overrides), overwrite=True)
bare = run.accelerator.unwrap_model(run.model)
training_forwards = [0]
allreduce_at = []  # index of the training micro-step (0-based) during whose backward a bucket was all-reduced


def count_forward(module, args):
    if module.training:
        training_forwards[0] += 1


def recording_hook(state, bucket):
    allreduce_at.append(training_forwards[0] - 1)
    return allreduce_hook(state, bucket)


bare.register_forward_pre_hook(count_forward)
run.model.register_comm_hook(dist.group.WORLD, recording_hook)
train(run)
with open(f"{result_path}.rank{run.accelerator.process_index}", "w") as f:
    json.dump({"training_forwards": training_forwards[0], "allreduce_at": allreduce_at, "model_type": type(run.model).__name__}, f)
sys.exit(end_process(0))
