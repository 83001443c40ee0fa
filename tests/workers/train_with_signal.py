"""Under torchrun (or alone): train, and have rank 0 (SIGNAL_RANK=R: rank R) send itself SIGUSR1 at its N-th
training micro-step; each rank prints the step it stopped after.

The signal is real and reaches the real handler; the hook only chooses the moment (mid-window when
N is not the last micro-step of a step). Ends like `launcher train` (end_run: the marker, EXIT_PREEMPTED after a preemption).
With SECOND_SIGNAL_DURING_SAVE=1 in the environment, a SIGTERM also arrives in the middle of that
checkpoint save. Usage: train_with_signal.py CONFIG MICRO_STEP [key=value ...]
"""

import os
import signal
import sys

from torch.nn.parallel import DistributedDataParallel

from launcher.build import build_run
from launcher.config import load_config
from launcher.distributed import end_process
from launcher.exits import end_run
from launcher.loop import train
from launcher.preemption import PreemptionFlag

config_path, micro_step, *overrides = sys.argv[1:]
preemption = PreemptionFlag()
run = build_run(load_config(config_path, overrides))
# under DDP the loop's first forward is the zero-loss pass that settles the buckets: not a micro-step
forwards = [-1 if isinstance(run.model, DistributedDataParallel) else 0]


def signal_at_micro_step(module, args):
    if module.training:
        if forwards[0] == int(micro_step) and run.accelerator.process_index == int(os.environ.get("SIGNAL_RANK", "0")):
            os.kill(os.getpid(), signal.SIGUSR1)
        forwards[0] += 1


run.accelerator.unwrap_model(run.model).register_forward_pre_hook(signal_at_micro_step)
if os.environ.get("SECOND_SIGNAL_DURING_SAVE") == "1":
    run.accelerator.register_save_state_pre_hook(lambda *args: os.kill(os.getpid(), signal.SIGTERM))
summary = train(run, preemption)
print(f"rank {run.accelerator.process_index}: stopped after step {summary.steps}, preempted {summary.preempted}", flush=True)
code = end_run(summary, run.cfg.output_dir, run.is_main_process, run.lock.release if run.lock is not None else None)
sys.exit(end_process(code))
