"""FSDP2 (`torch.distributed.fsdp.fully_shard`), applied by the launcher itself: Accelerate 1.15 returns a
DistributedDataParallel model when asked for FSDP on CPU, so its FSDP path cannot be what the CPU tests run, and the
GPU path would then differ from the tested one. Accelerate keeps the rest (process group, device, `backward`, RNG
states, the schedule). An accelerate config that selects FSDP version 2 is translated into the `fsdp` section here."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from launcher.backends.base import Backend, BackendKind
from launcher.config import FsdpConfig
from launcher.diagnostics import GradNorms
from launcher.errors import UsageError
from launcher.models.structure import transformer_blocks


def fsdp_from_accelerate(configured: FsdpConfig | None, deepspeed: Path | None) -> FsdpConfig | None:
    """The `fsdp` section: the config's, or the one an accelerate config selected (distributed_type FSDP, version 2).
    Accelerate is then told nothing of FSDP: the launcher applies fully_shard itself (launcher.backends)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return configured
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UsageError(
            "accelerate config: FSDP version 1 is not supported; set fsdp_config.fsdp_version: 2 (as configs/accelerate/fsdp2.yaml does)"
        )
    if deepspeed is not None:
        raise UsageError("deepspeed: the config names a DeepSpeed JSON but the accelerate config selects FSDP; keep one of them")
    os.environ.pop("ACCELERATE_USE_FSDP")
    if configured is not None:
        return configured
    return FsdpConfig(
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
        cpu_offload=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
    )


class Fsdp2Backend(Backend):
    """FSDP2: `fully_shard` on every transformer block and the root, parameters sharded per rank as DTensors.

    Accumulation as under DDP: the non-final micro-steps keep their gradients unsharded and local
    (`set_requires_gradient_sync(False)`), the window's last backward reduce-scatters them once per unit;
    `fsdp.sync_every_micro_step` reduce-scatters after every micro-step instead (the same numbers, k times the
    communication, a sharded instead of a full accumulated gradient in memory). Frozen parameters have no
    gradient, so they take neither gradient memory nor reduce-scatter traffic.
    """

    kind = BackendKind.FSDP2

    def __init__(self, acc: Accelerator, cfg: FsdpConfig, mixed_precision: str, model_dtype: str):
        super().__init__(acc)
        self.cfg, self.mixed_precision, self.model_dtype = cfg, mixed_precision, model_dtype

    @property
    def name(self) -> str:
        backend = "gloo" if self.acc.device.type == "cpu" else "nccl"
        return f"FSDP2 ({backend})"

    def shard(self, model: nn.Module) -> nn.Module:
        """fully_shard each transformer block, then the root (which takes every parameter left: embeddings, the
        final norm, the head). The freeze patterns were applied before, so a unit may mix frozen and trainable
        parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh(self.acc.device.type, (self.acc.num_processes,))
        policy = MixedPrecisionPolicy()
        if self.mixed_precision == "bf16" and self.model_dtype == "fp32":
            # compute in bf16 from fp32 master shards; gradients reduced in fp32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # pinned host memory (faster copies to the GPU) needs a GPU; on a CPU-only machine the shards live there anyway
        offload = CPUOffloadPolicy(pin_memory=self.acc.device.type == "cuda") if self.cfg.cpu_offload else OffloadPolicy()
        model = model.to(self.acc.device)
        options = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
        blocks = transformer_blocks(model)
        kinds = ", ".join(dict.fromkeys(type(b).__name__ for b in blocks)) or "no transformer"  # before fully_shard renames them
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.cfg.reshard_after_forward, **options)
        # the root's parameters are all-gathered at the first forward and needed again at the end: keep them
        fully_shard(model, reshard_after_forward=False, **options)
        self.notes = (
            f"FSDP2: fully_shard on {len(blocks)} {kinds} block(s) and the root over {self.acc.num_processes} rank(s);"
            f" reshard_after_forward {str(self.cfg.reshard_after_forward).lower()},"
            f" gradients reduce-scattered {'every micro-step' if self.cfg.sync_every_micro_step else 'once per optimizer step'}"
            + ("; compute in bf16, reduction in fp32" if policy.param_dtype == torch.bfloat16 else "")
            + ("; shards offloaded to the CPU" if self.cfg.cpu_offload else ""),
        )
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from accelerate.optimizer import AcceleratedOptimizer

        # not Accelerator.prepare: it would wrap the model in DDP (on CPU) and save the sharded optimizer state from
        # the main process only. The wrapper gives the same step/zero_grad gating and step_was_skipped as DDP's.
        self.model, self.optimizer = model, AcceleratedOptimizer(optimizer, device_placement=False)
        return self.model, self.optimizer

    def _communication(self, model: nn.Module, is_sync: bool):
        model.set_requires_gradient_sync(is_sync or self.cfg.sync_every_micro_step)
        return nullcontext()

    def unscale(self) -> None:
        pass  # fp16 (a loss scaler) is refused with fsdp; bf16 needs none

    def gradient_norms(self, params: list[nn.Parameter], norm_type: float) -> GradNorms:
        """Global pre-clip norms of the sharded gradients: each rank's shard norms, combined over the ranks in one
        all-reduce of a vector (one entry per parameter), so per-parameter norms cost no more than the total."""
        import torch.distributed as dist

        grads = [p.grad for p in params]
        local = [g.to_local() if g is not None else None for g in grads]
        present = [g for g in local if g is not None]
        norms = torch._foreach_norm(present, norm_type) if present else []
        zero, it = torch.zeros((), device=self.acc.device), iter(norms)
        # on the run's device even when the shards are offloaded to the CPU: NCCL reduces device tensors only
        shard_norms = torch.stack([next(it).float().to(self.acc.device) if g is not None else zero for g in local])
        if math.isinf(norm_type):
            dist.all_reduce(shard_norms, op=dist.ReduceOp.MAX)
            per_param = shard_norms
        else:
            powered = shard_norms.pow(norm_type)
            dist.all_reduce(powered, op=dist.ReduceOp.SUM)
            per_param = powered.pow(1.0 / norm_type)
        return GradNorms(list(per_param.unbind()), torch.linalg.vector_norm(per_param, norm_type))

    def clip(self, params: list[nn.Parameter], max_norm: float | None, norms: GradNorms) -> None:
        """The shards scaled by the global factor (each rank its own, no communication)."""
        if max_norm is None:
            return
        shards = [p.grad.to_local() for p in params if p.grad is not None]
        if not shards:
            return
        # min(1, max_norm / norm), as torch.nn.utils.clip_grads_with_norm_ computes it: the same factor as DDP's
        factor = torch.clamp(max_norm / (norms.total + 1e-6), max=1.0)
        torch._foreach_mul_(shards, factor.to(shards[0].device))

    def full_gradient(self, param: nn.Parameter) -> torch.Tensor:
        return param.grad.full_tensor()  # an all-gather: every rank asks, for the same names in the same order

    def local_gradient_norms(self, params: list[nn.Parameter]) -> None:
        return None

    no_local_norms = "its own gradients before the reduce-scatter are not recorded under FSDP2"

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All-gathered full weights on the CPU of the main process (the others get an empty dict): a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.acc.is_main_process else None

    SHARDED = "sharded"  # the checkpoint's subfolder of Distributed Checkpoint files (every rank writes its shards)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, self.optimizer.optimizer)}

    def save_state(self, folder: Path) -> None:
        """Model and optimizer shards through torch Distributed Checkpoint, which can load them on another world size;
        Accelerate's state for the rest (every rank's RNG states, the schedule)."""
        import torch.distributed.checkpoint as dcp

        self.acc.save_state(str(folder))
        dcp.save(self._state(), checkpoint_id=str(folder / self.SHARDED))

    def resume_problem(self, path: Path, state) -> str | None:
        return super().resume_problem(path, state)  # any world size: Distributed Checkpoint reshards

    def load_state(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        self.acc.load_state(str(folder))  # a rank the checkpoint had no RNG state for keeps its seeded one
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / self.SHARDED))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, state["optimizer"])
