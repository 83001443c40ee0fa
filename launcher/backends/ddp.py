"""DDP (and one process, which is DDP's code path without the wrapper): Accelerate's prepare, `no_sync` for the
micro-steps that do not end a window."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType
from torch import nn

from launcher.backends.base import Backend, BackendKind
from launcher.hang import counted_ddp_allreduce


class DdpBackend(Backend):
    kind = BackendKind.DDP
    no_local_norms = "its own gradients were not recorded (the model has another DDP comm hook)"

    @property
    def name(self) -> str:
        kind = self.acc.distributed_type
        return {DistributedType.NO: "single process", DistributedType.MULTI_CPU: "DDP (gloo)"}.get(kind, f"DDP ({kind.value})")

    def before_first_step(self, zero_loss_backward) -> None:
        """DDP regroups its gradient buckets after the first backward, in the order gradients became ready. With
        more than two ranks the layout changes the summation order inside the all-reduce, so a run resumed from a
        checkpoint (whose first step would use the initial layout) would drift from the uninterrupted run by float
        rounding. One backward of zeros settles the layout the same way in every run."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            zero_loss_backward()

    def _communication(self, model: nn.Module, is_sync: bool):
        """no_sync: gradients accumulate locally; the one all-reduce happens in the window's last backward."""
        return nullcontext() if is_sync else self.acc.no_sync(model)

    def local_gradient_norms(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Each rank's own gradient norms before they are averaged, filled in every backward that communicates
        (through a DDP comm hook, which also counts each bucket's all-reduce for the hang report), so a non-finite
        report can say which rank produced a nan; None where there are none (one process: its gradients are the local
        ones; another comm hook already set). Call it before the first backward."""
        if not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return None
        index = {id(p): i for i, p in enumerate(params)}
        local_norms = [torch.zeros((), device=self.acc.device)] * len(params)
        group = self.model.process_group

        def record_then_allreduce(state, bucket):
            for param, norm in zip(bucket.parameters(), torch._foreach_norm(bucket.gradients())):
                local_norms[index[id(param)]] = norm
            return counted_ddp_allreduce(bucket, group)  # DDP's default (divide by the world size, all-reduce), counted

        try:
            self.model.register_comm_hook(None, record_then_allreduce)
        except RuntimeError:  # DDP takes one comm hook, and the model has one (e.g. gradient compression)
            return None
        return local_norms
