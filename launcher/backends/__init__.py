"""The training backends behind one seam (launcher.backends.base): DDP, DeepSpeed ZeRO and FSDP2, and choosing one.

DDP and DeepSpeed are Accelerate's (`Accelerator.prepare`); FSDP2 is applied by the launcher (launcher.backends.fsdp2).
Everything that differs between them lives in this package: the loop, the build, the checkpoints and the
diagnostics ask the backend, never which one runs.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from launcher.backends.base import Backend, BackendKind
from launcher.backends.ddp import DdpBackend
from launcher.backends.deepspeed import DeepSpeedBackend
from launcher.backends.fsdp2 import Fsdp2Backend
from launcher.config import Config, DiagnosticsConfig

__all__ = ["Backend", "BackendKind", "backend_kind", "backend_problems", "make_backend"]


def backend_kind(cfg: Config, uses_deepspeed: bool) -> BackendKind:
    """The backend a config asks for (`uses_deepspeed`: a DeepSpeed JSON is in use, from the config or accelerate's)."""
    if uses_deepspeed:
        return BackendKind.DEEPSPEED
    return BackendKind.FSDP2 if cfg.fsdp is not None else BackendKind.DDP


def backend_problems(kind: BackendKind, cfg: DiagnosticsConfig) -> list[str]:
    """Why the backend cannot run as configured, one line each: packages it needs that are missing, diagnostics it
    cannot give (DeepSpeed steps inside backward and partitions the gradients; DDP and FSDP2 can form every gradient)."""
    if kind != BackendKind.DEEPSPEED:
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
    # Accelerate's DeepSpeed path also reads transformers' version: both are the deepspeed extra
    missing = [name for name in ("deepspeed", "transformers") if not _importable(name)]
    if missing:
        problems.append(
            f"deepspeed: DeepSpeed runs need the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, not installed here;"
            f" pip install -e '.[deepspeed]' (or scripts/setup deepspeed), or remove deepspeed to train with DDP"
        )
    return problems


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def make_backend(acc: Accelerator, cfg: Config) -> Backend:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(acc)
    if cfg.fsdp is not None:
        return Fsdp2Backend(acc, cfg.fsdp, cfg.train.mixed_precision, cfg.model.dtype)
    return DdpBackend(acc)
