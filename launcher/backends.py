"""The training backends behind one seam: DDP, DeepSpeed ZeRO and FSDP2.

Each backend answers the same few questions, so that the loop, the build, the checkpoints and the
diagnostics never ask which one runs:
- how the model and optimizer are wrapped (`shard` before the optimizer exists, `prepare` after);
- what a micro-step that does not end a window looks like (`micro_step`: no gradient communication);
- how the gradients are unscaled, measured and clipped (`unscale`, `gradient_norms`, `clip`);
- how the full weights are formed for the export (`full_state_dict`);
- how a checkpoint is written and read (`save_state`, `load_state`);
- which diagnostics it supports (`diagnostics_problems`).

DDP and DeepSpeed are Accelerate's (`Accelerator.prepare`). FSDP2 (`torch.distributed.fsdp.fully_shard`)
is applied here, by the launcher: Accelerate 1.15 returns a DistributedDataParallel model when asked for
FSDP on CPU, so its FSDP path cannot be what the CPU tests run, and the GPU path would then differ from
the tested one. Accelerate keeps the rest (process group, device, `backward`, RNG states, the schedule).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from launcher.config import Config, DiagnosticsConfig, FsdpConfig
from launcher.diagnostics import GradNorms, clip_gradients, gradient_norms


def backend_kind(cfg: Config, uses_deepspeed: bool) -> str:
    """'deepspeed', 'fsdp' or 'ddp' (one process is DDP's code path without the wrapper)."""
    if uses_deepspeed:
        return "deepspeed"
    return "fsdp" if cfg.fsdp is not None else "ddp"


def diagnostics_problems(kind: str, cfg: DiagnosticsConfig) -> list[str]:
    """The diagnostics a backend cannot give, one line each (DeepSpeed steps inside backward and partitions the
    gradients; DDP and FSDP2 can form every gradient)."""
    if kind != "deepspeed":
        return []
    problems = []
    if cfg.nonfinite == "skip":
        problems.append("diagnostics.nonfinite: skip is not available under DeepSpeed (the engine steps inside backward); use stop")
    if cfg.grad_norms_every is not None:
        problems.append(
            "diagnostics.grad_norms_every: per-layer gradient norms need DDP or FSDP2 (DeepSpeed partitions the gradients); set it to null"
        )
    if cfg.dump_grad:
        problems.append("diagnostics.dump_grad: needs DDP or FSDP2 (DeepSpeed partitions the gradients); set it to [] or run with --debug")
    return problems


def make_backend(acc: Accelerator, cfg: Config) -> Backend:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(acc)
    if cfg.fsdp is not None:
        return Fsdp2Backend(acc, cfg.fsdp, cfg.train.mixed_precision, cfg.model.dtype)
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

    notes: tuple[str, ...] = ()  # lines for the run header, once the model is wrapped

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
            return f"resume: '{path}' was written by {state.backend}, this run uses {self.name}; resume it with the backend that wrote it"
        return None

    def load_state(self, folder: Path) -> None:
        self.acc.load_state(str(folder))


DdpBackend = Backend


def backend_family(name: str) -> str:
    """The family of a backend name recorded in a checkpoint."""
    return "deepspeed" if name.startswith("DeepSpeed") else "fsdp" if name.startswith("FSDP2") else "ddp"


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
            return (
                f"resume: '{path}' holds DeepSpeed shards of {state.world_size} ranks, this run has {self.acc.num_processes};"
                f" resume it with {state.world_size} processes"
            )
        return super().resume_problem(path, state)


class Fsdp2Backend(Backend):
    """FSDP2: `fully_shard` on every transformer block and the root, parameters sharded per rank as DTensors.

    Accumulation as under DDP: the non-final micro-steps keep their gradients unsharded and local
    (`set_requires_gradient_sync(False)`), the window's last backward reduce-scatters them once per unit;
    `fsdp.sync_every_micro_step` reduce-scatters after every micro-step instead (the same numbers, k times the
    communication, a sharded instead of a full accumulated gradient in memory). Frozen parameters have no
    gradient, so they take neither gradient memory nor reduce-scatter traffic.
    """

    family = "fsdp"

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

        from launcher.models import transformer_blocks

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

    def before_first_step(self, zero_loss_backward) -> None:
        pass

    def micro_step(self, model: nn.Module, is_sync: bool):
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
