"""Under torchrun with fsdp set: train, recording every gradient reduce-scatter FSDP2 makes (at which training
micro-step, how many elements) and which parameters hold a gradient when the optimizer steps.

Usage: count_reduce_scatter.py CONFIG RESULT_JSON [key=value ...]
"""

import json
import sys

import torch.distributed as dist

from launcher.build import build_run
from launcher.config import load_config
from launcher.distributed import end_process
from launcher.loop import train

config_path, result_path, *overrides = sys.argv[1:]
run = build_run(load_config(config_path, overrides), overwrite=True)
training_forwards = [0]
reduce_scatters = []  # (training micro-step, 0-based; elements reduce-scattered)
had_gradient = set()


def count_forward(module, args):
    if module.training:
        training_forwards[0] += 1


reduce_scatter_single = dist.reduce_scatter_single


def recording_reduce_scatter(output, input, *args, **kwargs):
    reduce_scatters.append((training_forwards[0] - 1, input.numel()))
    return reduce_scatter_single(output, input, *args, **kwargs)


dist.reduce_scatter_single = recording_reduce_scatter  # FSDP2 calls it through the module, at call time
run.model.register_forward_pre_hook(count_forward)


def record_gradients(optimizer, args, kwargs):
    had_gradient.update(name for name, param in run.model.named_parameters() if param.grad is not None)


run.optimizer.optimizer.register_step_pre_hook(record_gradients)
train(run)
units = [m for m in run.model.modules() if hasattr(m, "set_requires_gradient_sync")]
with open(f"{result_path}.rank{run.accelerator.process_index}", "w") as f:
    json.dump(
        {
            "model_type": type(run.model).__name__,
            "training_forwards": training_forwards[0],
            "reduce_scatters": reduce_scatters,
            "had_gradient": sorted(had_gradient),
            "units": len(units),
            "world_size": run.accelerator.num_processes,
        },
        f,
    )
sys.exit(end_process(0))
