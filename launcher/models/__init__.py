"""Models: the built-in GPT, Hugging Face causal LMs (pretrained or from a config), or a user's factory.

A model takes `input_ids` [batch, seq] and returns logits [batch, seq, vocab] (or an object with
`.logits`, as Hugging Face models do). The loss is computed by the loop, so that it can be
normalized exactly over tokens.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from launcher.config import ModelConfig
from launcher.errors import UsageError
from launcher.models import hf
from launcher.models.gpt import GPT
from launcher.models.structure import DTYPES, embedding_rows, logits_of, transformer_blocks

__all__ = ["DTYPES", "GPT", "build_model", "embedding_rows", "logits_of", "transformer_blocks"]


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, weights: bool = True, search_dirs: tuple[Path, ...] = ()) -> nn.Module:
    """The configured model on the current default device. `weights=False` (on the meta device, for names and
    shapes) builds a pretrained model from its config alone; `search_dirs` are where a factory's module may live."""
    if cfg.is_hf:
        model = hf.build_hf_model(cfg, seq_len, weights, vocab_size)
    elif cfg.factory is not None:
        model = build_factory_model(cfg, vocab_size, seq_len, search_dirs)
    else:
        model = GPT(vocab_size, seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout, cfg.gradient_checkpointing)
    return model.to(DTYPES[cfg.dtype]) if cfg.dtype != "fp32" else model


class _MetaInitSkipped(TorchFunctionMode):
    """Calls of `torch.nn.init`'s functions on meta tensors return the tensor untouched. A mode, not a patch of
    `torch.nn.init`: nothing global changes, so a module imported meanwhile (transformers keeps references to
    torch's initializers at import) records the real functions, and a real tensor is initialized as always."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and getattr(func, "__name__", "").endswith("_"):
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def initializers_skipped():
    """`torch.nn.init`'s initializers do nothing inside on meta tensors: for a model built on the meta device, whose
    values never exist. Initializing a meta tensor runs torch's Python reference kernels, whose first use imports
    torch._dynamo (2-3 s of every process's start, for numbers that are thrown away)."""
    with _MetaInitSkipped():
        yield


@contextmanager
def _importable_from(dirs: tuple[Path, ...]):
    added = [str(d) for d in dirs if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            sys.path.remove(d)


def build_factory_model(cfg: ModelConfig, vocab_size: int, seq_len: int, search_dirs: tuple[Path, ...]) -> nn.Module:
    """`module:callable` called with vocab_size, seq_len and factory_kwargs; every failure is the user's, in one line."""
    module_name, attr = cfg.factory.split(":")
    with _importable_from(search_dirs):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                where = ", ".join(str(d) for d in search_dirs) or "the working directory"
                raise UsageError(
                    f"model.factory: no module '{module_name}' (looked in {where} and on PYTHONPATH); put {module_name}.py"
                    " beside the config file or in the working directory"
                ) from None
            raise UsageError(f"model.factory: importing '{module_name}' failed: {_where(err)}; fix the module") from None
        except Exception as err:  # the user's module raised while importing
            raise UsageError(f"model.factory: importing '{module_name}' failed: {_where(err)}; fix the module") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"model.factory: module '{module_name}' has no callable '{attr}'; check the name after the colon")
    try:
        model = factory(vocab_size=vocab_size, seq_len=seq_len, **cfg.factory_kwargs)
    except TypeError as err:
        raise UsageError(
            f"model.factory: calling '{cfg.factory}' failed: {_where(err)}; it is called as"
            f" {attr}(vocab_size=..., seq_len=..., **model.factory_kwargs)"
        ) from None
    except Exception as err:
        raise UsageError(f"model.factory: '{cfg.factory}' raised {_where(err)}; fix the factory") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _where(err: Exception) -> str:
    """'Type: message (file:line)' of the innermost frame: enough to find a user's mistake without a traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    at = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}{at}" if message else f"{type(err).__name__}{at}"


def check_model_output(model: nn.Module, cfg: ModelConfig, vocab_size: int, seq_len: int) -> None:
    """A user's model on one tiny batch (CPU, no_grad): it must return [batch, seq, >= vocab] logits. ValidatedRun
    before anything is written, so a model that cannot train leaves no trace on disk."""
    if cfg.factory is None:
        return
    n = min(seq_len, 8)
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, n, dtype=torch.long))
    except Exception as err:
        raise UsageError(
            f"model.factory: the model's forward failed on a batch of input_ids [1, {n}]: {_where(err)}; its forward must take input_ids [batch, seq]"
        ) from None
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise UsageError(
            f"model.factory: the model returned {type(output).__name__}; return logits [batch, seq, vocab] (a tensor) or an object with .logits"
        )
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, n) or logits.shape[2] < vocab_size:
        raise UsageError(
            f"model.factory: the model returned logits of shape {list(logits.shape)} for input_ids [1, {n}];"
            f" expected [1, {n}, {vocab_size}] (batch, seq, the tokenizer's vocabulary)"
        )


def describe_model(model: nn.Module, cfg) -> str:
    """The run header's model line: what was built, its size, and in which precision its weights train."""
    source = {
        "pretrained": f"pretrained '{cfg.model.pretrained}'",
        "hf_config": "a Hugging Face config (from scratch)",
        "factory": f"model.factory '{cfg.model.factory}'",
        "builtin": "the built-in GPT",
    }[cfg.model.source]
    arch = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.model.dtype == "fp32":
        how = "FSDP2's mixed-precision policy" if getattr(cfg, "fsdp", None) is not None else "autocast"
        weights = "weights fp32" + (f", computed in {cfg.train.mixed_precision} ({how})" if cfg.train.mixed_precision != "no" else "")
    else:
        weights = f"weights {cfg.model.dtype}: pure 16-bit training (model.dtype), no fp32 master copy"
    extras = [f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {cfg.lora.target_modules}"] if cfg.lora is not None else []
    extras += ["gradient checkpointing"] if cfg.model.gradient_checkpointing else []
    return f"model: {source} ({arch[0]}), {total:,} parameters ({trainable:,} trainable); {weights}" + "".join(f"; {e}" for e in extras)
