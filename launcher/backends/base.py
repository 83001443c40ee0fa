"""The seam every training backend implements, and the one name each backend has.

Each backend answers the same few questions, so that the loop, the build, the checkpoints and the
diagnostics never ask which one runs:
- how the model and optimizer are wrapped (`shard` before the optimizer exists, `prepare` after);
- what a micro-step looks like (`micro_step`: whether gradients are communicated, what Accelerate is told);
- how the gradients are unscaled, measured and clipped (`unscale`, `gradient_norms`, `clip`), and what a
  dropped step does (`drop_step`: the fp16 scaler);
- how the full weights are formed for the export (`full_state_dict`);
- how a checkpoint is written and read (`save_state`, `load_state`, `resume_problem`).

The defaults here are Accelerate's (its `prepare`, `save_state`, `load_state`); launcher.backends.ddp,
.deepspeed and .fsdp2 override what differs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from launcher.diagnostics import GradNorms, clip_gradients, gradient_norms


class BackendKind(str, Enum):
    """The one identity of a backend: chosen from the config, stored in checkpoints (`backend_kind`), compared at
    resume. A checkpoint can be resumed by the kind that wrote it."""

    DDP = "ddp"  # also one process: DDP's code path without the wrapper
    DEEPSPEED = "deepspeed"
    FSDP2 = "fsdp2"

    @classmethod
    def of_checkpoint(cls, kind: str | None, name: str) -> BackendKind:
        """The kind of a checkpoint's trainer state; one written before `backend_kind` was recorded has only the
        display name (`backend`), from which the kind is read."""
        if kind is not None:
            return cls(kind)
        return cls.DEEPSPEED if name.startswith("DeepSpeed") else cls.FSDP2 if name.startswith("FSDP2") else cls.DDP


class Backend:
    """What every backend shares: Accelerate's prepare, state saving and loading; gradients measured and clipped as
    they are on each rank. Subclasses set `kind` and override what differs."""

    kind: BackendKind

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.model: nn.Module | None = None
        self.optimizer = None

    @property
    def name(self) -> str:
        """For people: the run header, reports, the checkpoint's `backend` (its `backend_kind` is `kind`)."""
        raise NotImplementedError

    @property
    def offloads_optimizer(self) -> bool:
        return False

    notes: tuple[str, ...] = ()  # lines for the run header, once the model is wrapped
    no_local_norms = "its own gradients were not recorded"  # why local_gradient_norms gave none

    def shard(self, model: nn.Module) -> nn.Module:
        """Before the optimizer is built (it must see the parameters the backend trains)."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        return self.model, self.optimizer

    def before_first_step(self, zero_loss_backward) -> None:
        pass

    def micro_step(self, model: nn.Module, is_sync: bool):
        """The context of one micro-step's forward and backward; `is_sync`: the window's last. Accelerate is told
        whether this micro-step ends the window: AcceleratedOptimizer and DeepSpeed's engine step only then."""
        self.acc.sync_gradients = is_sync
        return self._communication(model, is_sync)

    def _communication(self, model: nn.Module, is_sync: bool):
        raise NotImplementedError

    def unscale(self) -> None:
        """fp16: divide the gradients by the loss scale (the scaler's own inf check happens here); a no-op otherwise."""
        self.acc.unscale_gradients()

    def drop_step(self) -> None:
        """A step the loop drops (diagnostics.nonfinite: skip): the fp16 scaler, unscaled for it, is reset for the next."""
        if self.acc.scaler is not None:
            self.acc.scaler.update()

    def gradient_norms(self, params: list[nn.Parameter], norm_type: float) -> GradNorms:
        return gradient_norms(params, norm_type)

    def clip(self, params: list[nn.Parameter], max_norm: float | None, norms: GradNorms) -> None:
        clip_gradients(params, max_norm, norms)

    def full_gradient(self, param: nn.Parameter) -> torch.Tensor:
        return param.grad

    def local_gradient_norms(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Each rank's own gradient norms before they are averaged, or None where there are none."""
        return None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank calls it; the full weights on the main process (without the wrappers, so names match the bare
        model's)."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False).state_dict()

    def save_state(self, folder: Path) -> None:
        """Every rank: its files of a checkpoint (Accelerate's state: model, optimizer, scaler, RNG states, schedule)."""
        self.acc.save_state(str(folder))

    def resume_problem(self, path: Path, state) -> str | None:
        """Why this backend cannot resume the checkpoint `state` (its trainer state), or None."""
        if self.kind != BackendKind.of_checkpoint(state.backend_kind, state.backend):
            return f"resume: '{path}' was written by {state.backend}, this run uses {self.name}; resume it with the backend that wrote it"
        return None

    def load_state(self, folder: Path) -> None:
        self.acc.load_state(str(folder))
