"""DeepSpeed ZeRO through Accelerate: which DeepSpeed JSON a run uses (the config's or an accelerate config's),
that JSON resolved against the launcher config (launcher.backends.deepspeed_config), and the backend itself."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from launcher.backends import deepspeed_config
from launcher.backends.base import Backend, BackendKind
from launcher.config import TrainConfig
from launcher.diagnostics import GradNorms
from launcher.errors import UsageError


def deepspeed_json(configured: Path | None) -> Path | None:
    """The DeepSpeed JSON: the config's `deepspeed` key, or the one an accelerate config selected."""
    from_accelerate = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not named or named == "none":
            raise UsageError(
                "accelerate config: DeepSpeed is selected without deepspeed_config_file; name a JSON such as configs/deepspeed/zero2.json there"
            )
        from_accelerate = Path(named)
    if configured and from_accelerate and configured.resolve() != from_accelerate.resolve():
        raise UsageError(f"deepspeed: the config names '{configured}' but the accelerate config names '{from_accelerate}'; keep one of them")
    return configured or from_accelerate


def resolved_deepspeed_config(configured: Path | None, cfg: TrainConfig, world_size: int) -> dict | None:
    """The DeepSpeed JSON in use (if any) with every launcher-owned value filled from `cfg` (mismatches refused)."""

    json_path = deepspeed_json(configured)
    if json_path is None:
        return None
    return deepspeed_config.resolve(deepspeed_config.read_deepspeed_json(json_path), cfg, world_size, json_path)


def skip_deepspeed_shared_memory_op() -> None:
    """On the CPU, DeepSpeed's communication set-up compiles a shared-memory all-reduce (a minute or two, once per
    machine) and loads it in every process. Only its inference all-reduce uses that op, never training: marked
    unavailable, DeepSpeed goes on without it (its collectives are torch.distributed's, on gloo)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO through Accelerate: the engine clips and steps inside the window's last backward, and its
    gradients are partitioned."""

    kind = BackendKind.DEEPSPEED

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.acc.state.deepspeed_plugin.zero_stage}"

    @property
    def offloads_optimizer(self) -> bool:
        """zero_optimization.offload_optimizer.device cpu."""
        zero = self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return (zero.get("offload_optimizer") or {}).get("device") == "cpu"

    def _communication(self, model: nn.Module, is_sync: bool):
        return nullcontext() if is_sync else self.acc.no_sync(model)

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
