"""Model factories for tests, loaded through `model.factory: factories:NAME` (tests/ is on sys.path)."""

import os
import time

import torch
from torch import nn

from launcher.models import GPT


class Amplified(nn.Module):
    """The built-in GPT with its logits multiplied by a large learnable gain: fp16 gradients overflow
    until the loss scaler has backed off far enough."""

    def __init__(self, gpt: nn.Module, gain: float):
        super().__init__()
        self.gpt = gpt
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, input_ids):
        return self.gpt(input_ids) * self.gain


def overflowing_gpt(vocab_size: int, seq_len: int, gain: float = 3e4) -> nn.Module:
    return Amplified(GPT(vocab_size, seq_len, n_layer=1, n_head=2, d_model=32), gain)


def nan_gradient_gpt(vocab_size: int, seq_len: int, param: str, rank: int, step: int, accumulation: int) -> nn.Module:
    """The built-in GPT whose parameter `param` gets a nan gradient on global rank `rank` in optimizer step
    `step` (1-based), as a broken kernel or a bad sample would make it: locally, before the all-reduce."""
    return plant_nan(GPT(vocab_size, seq_len, n_layer=2, n_head=2, d_model=32), param, rank, step, accumulation)


def nan_gradient_hf(vocab_size: int, seq_len: int, path: str, param: str, rank: int, step: int, accumulation: int) -> nn.Module:
    """A pretrained Hugging Face model (fp32, as the launcher loads it) with a nan planted like nan_gradient_gpt's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return plant_nan(model, param, rank, step, accumulation)


def plant_nan(model: nn.Module, param: str, rank: int, step: int, accumulation: int) -> nn.Module:
    import os

    if int(os.environ.get("RANK", 0)) != rank:
        return model
    # every backward reaches the parameter once; under DDP the first is the launcher's zero-loss bucket settling
    backwards = [-1 if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0]

    def plant(grad: torch.Tensor) -> torch.Tensor:
        backwards[0] += 1
        in_step = (backwards[0] - 1) // accumulation + 1 if backwards[0] > 0 else 0
        return torch.full_like(grad, float("nan")) if in_step == step else grad

    dict(model.named_parameters())[param].register_hook(plant)
    return model


class SlowStopSave(GPT):
    """The built-in GPT whose checkpoint takes SLOW_SAVE_S more seconds (from the environment) once a stop signal
    has arrived: a save slower than torch's 30-second agent shutdown timeout; and whose training forwards take
    SLOW_FORWARD_S more seconds in a job's first start (time for a test to act mid-run). Weights and training are the
    GPT's."""

    def forward(self, input_ids):
        import os
        import time

        if self.training and not int(os.environ.get("SLURM_RESTART_COUNT", 0)):  # a restarted job runs at full speed
            time.sleep(float(os.environ.get("SLOW_FORWARD_S", 0)))
        return super().forward(input_ids)

    def state_dict(self, *args, **kwargs):
        import os
        import signal
        import time

        delay = float(os.environ.get("SLOW_SAVE_S", 0))
        flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)  # the launcher's PreemptionFlag
        if delay and getattr(flag, "received", None):
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"slow save: {delay:g} s more", flush=True)
            time.sleep(delay)
        return super().state_dict(*args, **kwargs)


def slow_stop_save_gpt(vocab_size: int, seq_len: int, **kwargs) -> nn.Module:
    return SlowStopSave(vocab_size, seq_len, **kwargs)


class Hanging(GPT):
    """The built-in GPT whose `forward`-th training forward (1-based) on global rank `rank` sleeps `seconds`: a hung
    GPU or node, as the other ranks see it. With `once` (a file path), only in the run that creates that file: the
    resumed run trains through."""

    def __init__(self, vocab_size: int, seq_len: int, rank: int, forward: int, seconds: float, once: str | None = None, **kwargs):
        super().__init__(vocab_size, seq_len, **kwargs)
        self.hang_rank, self.hang_forward, self.seconds, self.forwards = rank, forward, seconds, 0
        self.once = None
        if once is not None and int(os.environ.get("RANK", 0)) == rank and "LOCAL_RANK" in os.environ:
            # the first process of that rank to build it writes its pid there (a worker may build its model twice)
            if not os.path.exists(once):
                with open(once, "w") as f:
                    f.write(str(os.getpid()))
            with open(once) as f:
                self.once = f.read().split()[0] == str(os.getpid())
            self.once_file = once

    def forward(self, input_ids):
        if self.training and int(os.environ.get("RANK", 0)) == self.hang_rank and self.once is not False:
            self.forwards += 1
            if self.forwards == self.hang_forward + 1:  # the first forward settles DDP's buckets
                if self.once:  # when the sleep began, for the test
                    with open(self.once_file, "a") as f:
                        f.write(f" {time.time()}")
                time.sleep(self.seconds)
        return super().forward(input_ids)


def hanging_gpt(vocab_size: int, seq_len: int, **kwargs) -> nn.Module:
    return Hanging(vocab_size, seq_len, **kwargs)


class Raising(GPT):
    """The built-in GPT whose `forward`-th training forward (1-based) on global rank `rank` raises: a bug of the
    launcher, as the ranks see it."""

    def __init__(self, vocab_size: int, seq_len: int, rank: int, forward: int, **kwargs):
        super().__init__(vocab_size, seq_len, **kwargs)
        self.fail_rank, self.fail_forward, self.forwards = rank, forward, 0

    def forward(self, input_ids):
        import os

        if self.training and int(os.environ.get("RANK", 0)) == self.fail_rank:
            self.forwards += 1
            if self.forwards == self.fail_forward + 1:  # the first forward settles DDP's buckets
                raise ValueError(f"planted bug in forward {self.fail_forward}")
        return super().forward(input_ids)


def raising_gpt(vocab_size: int, seq_len: int, **kwargs) -> nn.Module:
    return Raising(vocab_size, seq_len, **kwargs)


class Slow(GPT):
    """The built-in GPT whose training forwards on global rank `rank` each take `seconds` more: a slow GPU, a
    rank that every other rank waits for at each step."""

    def __init__(self, vocab_size: int, seq_len: int, rank: int, seconds: float, **kwargs):
        super().__init__(vocab_size, seq_len, **kwargs)
        self.slow = int(os.environ.get("RANK", 0)) == rank and "LOCAL_RANK" in os.environ
        self.delay_s = seconds

    def forward(self, input_ids):
        if self.training and self.slow:
            time.sleep(self.delay_s)
        return super().forward(input_ids)


def slow_gpt(vocab_size: int, seq_len: int, **kwargs) -> nn.Module:
    return Slow(vocab_size, seq_len, **kwargs)


def slow_data_gpt(vocab_size: int, seq_len: int, rank: int, step: int, seconds: float, **kwargs) -> nn.Module:
    """The built-in GPT, trained from a data source that on global rank `rank` takes `seconds` for the batches of
    optimizer step `step` (0-based): a stuck file system or data loader on one rank. (The factory runs in each worker
    before its data is read, so it can slow that worker's TrainData there.)"""
    if int(os.environ.get("RANK", 0)) == rank and "LOCAL_RANK" in os.environ:
        from launcher.data import store

        window = store.TrainData.window

        def slow_window(self, at: int):
            if at == step:
                time.sleep(seconds)
            return window(self, at)

        store.TrainData.window = slow_window
    return GPT(vocab_size, seq_len, **kwargs)


def slow_setup_gpt(vocab_size: int, seq_len: int, seconds: float, **kwargs) -> nn.Module:
    """The built-in GPT, with data that takes rank 0 `seconds` more to prepare (a large corpus to tokenize) while
    the other ranks wait: the factory runs in each worker before the data is prepared."""
    if int(os.environ.get("RANK", 0)) == 0 and "LOCAL_RANK" in os.environ:
        from launcher import build

        prepare = build.prepare_splits

        def slow_prepare(*args, delay_s=seconds, **kwargs):
            time.sleep(delay_s)
            return prepare(*args, **kwargs)

        build.prepare_splits = slow_prepare
    return GPT(vocab_size, seq_len, **kwargs)
