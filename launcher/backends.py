"""The training backends behind one seam: DDP and DeepSpeed ZeRO.

Each backend answers the same few questions, so that the loop, the build, the checkpoints and the
diagnostics never ask which one runs:
- how the model and optimizer are wrapped (`shard` before the optimizer exists, `prepare` after);
- what a micro-step that does not end a window looks like (`micro_step`: no gradient communication);
- how the gradients are unscaled, measured and clipped (`unscale`, `gradient_norms`, `clip`);
- how the full weights are formed for the export (`full_state_dict`);
- how a checkpoint is written and read (`save_state`, `load_state`);
- which diagnostics it supports (`diagnostics_problems`).

Both are Accelerate's (`Accelerator.prepare`); Accelerate also owns the process group, the device,
`backward`, the RNG states and the schedule.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from launcher.config import Config, DiagnosticsConfig
from launcher.diagnostics import GradNorms, clip_gradients, gradient_norms
from launcher.errors import UsageError


def backend_kind(cfg: Config, uses_deepspeed: bool) -> str:
    """'deepspeed' or 'ddp' (one process is DDP's code path without the wrapper)."""
    return "deepspeed" if uses_deepspeed else "ddp"


def diagnostics_problems(kind: str, cfg: DiagnosticsConfig) -> list[str]:
    """The diagnostics a backend cannot give, one line each (DeepSpeed steps inside backward and partitions the
    gradients; DDP can form every gradient)."""
    if kind != "deepspeed":
        return []
    problems = []
    if cfg.nonfinite == "skip":
        problems.append("diagnostics.nonfinite: skip is not available under DeepSpeed (the engine steps inside backward); use stop")
    if cfg.grad_norms_every is not None:
        problems.append("diagnostics.grad_norms_every: per-layer gradient norms need DDP (DeepSpeed partitions the gradients); set it to null")
    if cfg.dump_grad:
        problems.append("diagnostics.dump_grad: needs DDP (DeepSpeed partitions the gradients); set it to [] or run with --debug")
    return problems


def make_backend(acc: Accelerator, cfg: Config) -> Backend:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(acc)
    return DdpBackend(acc)


class Backend:
    """DDP (and one process): Accelerate's prepare, `no_sync`, the gradients as they are."""

    # a checkpoint written by one of these families can be resumed by another of the same family
    family = "ddp"

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.model: nn.Module | None = None
        self.optimizer = None

    @property
    def name(self) -> str:
        kind = self.acc.distributed_type
        return {DistributedType.NO: "single process", DistributedType.MULTI_CPU: "DDP (gloo)"}.get(kind, f"DDP ({kind.value})")

    @property
    def offloads_optimizer(self) -> bool:
        return False

    def shard(self, model: nn.Module) -> nn.Module:
        """Before the optimizer is built (it must see the parameters the backend trains)."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        return self.model, self.optimizer

    def before_first_step(self, zero_loss_backward) -> None:
        """DDP regroups its gradient buckets after the first backward, in the order gradients became ready. With
        more than two ranks the layout changes the summation order inside the all-reduce, so a run resumed from a
        checkpoint (whose first step would use the initial layout) would drift from the uninterrupted run by float
        rounding. One backward of zeros settles the layout the same way in every run."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            zero_loss_backward()

    def micro_step(self, model: nn.Module, is_sync: bool):
        """no_sync: gradients accumulate locally; the one all-reduce happens in the window's last backward."""
        return nullcontext() if is_sync else self.acc.no_sync(model)

    def unscale(self) -> None:
        """fp16: divide the gradients by the loss scale (the scaler's own inf check happens here); a no-op otherwise."""
        self.acc.unscale_gradients()

    def gradient_norms(self, params: list[nn.Parameter], norm_type: float) -> GradNorms:
        return gradient_norms(params, norm_type)

    def clip(self, params: list[nn.Parameter], max_norm: float | None, norms: GradNorms) -> None:
        clip_gradients(params, max_norm, norms)

    def full_gradient(self, param: nn.Parameter) -> torch.Tensor:
        return param.grad

    def local_gradient_norms(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Each rank's own gradient norms before they are averaged, filled in every backward that communicates
        (through a DDP comm hook), so a non-finite report can say which rank produced a nan; None where there are
        none (one process: its gradients are the local ones; another comm hook already set)."""
        if not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return None
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        index = {id(p): i for i, p in enumerate(params)}
        local_norms = [torch.zeros((), device=self.acc.device)] * len(params)

        def record_then_allreduce(state, bucket):
            for param, norm in zip(bucket.parameters(), torch._foreach_norm(bucket.gradients())):
                local_norms[index[id(param)]] = norm
            return allreduce_hook(state, bucket)  # DDP's default: divide by the world size, all-reduce

        try:
            self.model.register_comm_hook(None, record_then_allreduce)
        except RuntimeError:  # DDP takes one comm hook, and the model has one (e.g. gradient compression)
            return None
        return local_norms

    no_local_norms = "its own gradients were not recorded (the model has another DDP comm hook)"

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank calls it; the full weights on the main process (without the DDP and torch.compile wrappers,
        so names match the bare model's)."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False).state_dict()

    def save_state(self, folder: Path) -> None:
        """Every rank: its files of a checkpoint (Accelerate's state: model, optimizer, scaler, RNG states, schedule)."""
        self.acc.save_state(str(folder))

    def resume_problem(self, path: Path, state) -> str | None:
        """Why this backend cannot resume the checkpoint `state` (its trainer state), or None."""
        if self.family != backend_family(state.backend):
            return (f"resume: '{path}' was written by {state.backend}, this run uses {self.name};"
                    f" resume it with the backend that wrote it")
        return None

    def load_state(self, folder: Path) -> None:
        self.acc.load_state(str(folder))


DdpBackend = Backend


def backend_family(name: str) -> str:
    """The family of a backend name recorded in a checkpoint."""
    return "deepspeed" if name.startswith("DeepSpeed") else "ddp"


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO through Accelerate: the engine clips and steps inside the window's last backward, and its
    gradients are partitioned."""

    family = "deepspeed"

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.acc.state.deepspeed_plugin.zero_stage}"

    @property
    def offloads_optimizer(self) -> bool:
        """zero_optimization.offload_optimizer.device cpu."""
        zero = self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return (zero.get("offload_optimizer") or {}).get("device") == "cpu"

    def unscale(self) -> None:
        pass  # the engine unscales inside its step

    def gradient_norms(self, params: list[nn.Parameter], norm_type: float) -> GradNorms:
        """The pre-clip global norm the engine computed when it clipped (its gradient_clipping is
        train.max_grad_norm) and stepped inside the sync micro-step's backward."""
        norm = self.acc.clip_grad_norm_(params, None, norm_type=norm_type)
        return GradNorms(None, torch.as_tensor(norm if norm is not None else math.nan, dtype=torch.float32, device=self.acc.device))

    def clip(self, params: list[nn.Parameter], max_norm: float | None, norms: GradNorms) -> None:
        pass  # the engine has clipped already

    def local_gradient_norms(self, params: list[nn.Parameter]) -> None:
        return None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated weights under any ZeRO stage; collectives under ZeRO-3, so every rank calls it.

        Trainable parameters come from the optimizer's fp32 master copies (under bf16/fp16 the module
        holds only 16-bit copies); frozen parameters and buffers from the module.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        # ZeRO-3: needs stage3_gather_16bit_weights_on_model_save, and returns None off the main process
        state_dict = self.acc.get_state_dict(self.model)
        # every name of a tied parameter (GPT-2's lm_head and embedding) gets the master copy
        for name, param in self.acc.unwrap_model(self.model).named_parameters(remove_duplicate=False):
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)  # a collective under ZeRO-3: every rank asks
                if master is not None and state_dict is not None:
                    state_dict[name] = master.detach().to("cpu")
        return state_dict

    def resume_problem(self, path: Path, state) -> str | None:
        if state.world_size != self.acc.num_processes:
            return (f"resume: '{path}' holds DeepSpeed shards of {state.world_size} ranks, this run has {self.acc.num_processes};"
                    f" resume it with {state.world_size} processes")
        return super().resume_problem(path, state)
