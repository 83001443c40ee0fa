"""Hugging Face causal LMs: loading (pretrained or from a config), LoRA through peft, and exports that load back.

Weights are trained as fp32 master copies whatever dtype the checkpoint was saved in (most are bf16):
`train.mixed_precision` casts for compute, as for the built-in GPT. `model.dtype: bf16` is the explicit
opt-in for pure 16-bit weights. `inspect`, `plan` and the pre-flight build the model from its config on
the meta device, so they read no weights and allocate nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config, ExportConfig, LoraConfig, ModelConfig
from launcher.distributed import env_rank
from launcher.errors import UsageError
from launcher.freezing import PEFT_PREFIX
from launcher.models.structure import DTYPES, embedding_rows


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("model: Hugging Face models need the transformers package; pip install -e '.[hf]' (or scripts/setup hf)") from None
    transformers.utils.logging.disable_progress_bar()  # no per-load progress bars in the run's output
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # a hub id without a reachable hub: one error, not each retry
    return transformers


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:240] if text else type(err).__name__


def hf_model_config(cfg: ModelConfig):
    """The architecture's config: model.pretrained's or model.hf_config's config.json, or the inline mapping."""
    transformers = _transformers()
    key = "model.pretrained" if cfg.pretrained is not None else "model.hf_config"
    if isinstance(cfg.hf_config, dict):
        settings = dict(cfg.hf_config)
        try:
            return transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
        except Exception as err:
            raise UsageError(f"model.hf_config: not a valid Hugging Face config ({_reason(err)}); check model_type and its keys") from None
    source = str(cfg.pretrained if cfg.pretrained is not None else cfg.hf_config)  # the config checked the folder
    try:
        return transformers.AutoConfig.from_pretrained(source)
    except Exception as err:  # OSError (no folder, offline hub), ValueError (unknown model_type), ...
        raise UsageError(f"{key}: cannot read the model config of '{source}' ({_reason(err)}); point it at a Hugging Face model folder") from None


def build_hf_model(cfg: ModelConfig, seq_len: int, weights: bool, vocab_size: int | None = None) -> nn.Module:
    """AutoModelForCausalLM with its weights (model.pretrained), or freshly initialized (model.hf_config, or
    `weights=False` for names and shapes only). Trainable weights in model.dtype (fp32 by default)."""
    transformers = _transformers()

    config = hf_model_config(cfg)
    dtype = DTYPES[cfg.dtype]
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        key = "model.pretrained" if cfg.pretrained is not None else "model.hf_config"
        raise UsageError(
            f"data.seq_len: {seq_len} is longer than the model's context ({key}: max_position_embeddings"
            f" {positions}); set data.seq_len to {positions} or less"
        )
    if vocab_size is not None and cfg.pretrained is None and isinstance(cfg.hf_config, dict) and "vocab_size" not in cfg.hf_config:
        config.vocab_size = vocab_size  # an inline architecture takes the tokenizer's size unless it names one
    try:
        if weights and cfg.pretrained is not None:
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=config, dtype=dtype, output_loading_info=True)
            _warn_about_loading(cfg.pretrained, loading)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except UsageError:
        raise
    except Exception as err:
        source = cfg.pretrained or cfg.hf_config
        raise UsageError(
            f"model: cannot build a causal LM from '{source}' ({_reason(err)}); it must be an AutoModelForCausalLM architecture"
        ) from None
    model.config.use_cache = False  # training never reuses past keys/values; saves memory and a warning
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA, frozen embeddings) and keeps dropout's RNG
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _warn_about_loading(source, loading: dict) -> None:
    """One line (main process) naming the parameters the folder has no tensor for, which from_pretrained initialized
    as the architecture does (seeded: the same on every rank), and the folder's tensors no parameter takes. A fine-tune
    may mean it (a new head); a truncated or converted checkpoint does not, and a silent fresh tensor would hide it."""

    missing, unexpected = sorted(loading.get("missing_keys") or ()), sorted(loading.get("unexpected_keys") or ())
    if env_rank() != 0 or not (missing or unexpected):
        return

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = [f"no tensor for {names(missing)}: initialized fresh, as from_pretrained does"] if missing else []
    parts += [f"{len(unexpected)} tensor(s) that no parameter takes, ignored: {names(unexpected)}"] if unexpected else []
    print(f"launcher: warning: model.pretrained: '{source}' has " + "; and ".join(parts) + "; check that it is the model you meant", file=sys.stderr)


def fit_embeddings(model: nn.Module, vocab_size: int, cfg: Config) -> None:
    """The tokenizer's ids must index the embedding: refuse a larger tokenizer, or grow the rows when asked."""

    rows = embedding_rows(model)
    if rows is None or vocab_size <= rows:
        return
    key = "model.pretrained" if cfg.model.pretrained is not None else "model.hf_config"
    if not cfg.model.resize_embeddings or not hasattr(model, "resize_token_embeddings"):
        raise UsageError(
            f"tokenizer: '{cfg.tokenizer or cfg.model.pretrained}' has {vocab_size} ids but {key}'s embedding has"
            f" {rows} rows; use the model's own tokenizer, or set model.resize_embeddings: true to add rows"
        )
    # new rows start at the mean of the old ones (transformers' mean_resizing), so new tokens begin as an average token
    model.resize_token_embeddings(vocab_size, mean_resizing=not _on_meta(model))


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """peft's LoRA: adapters on the target modules, every base parameter frozen. Returns peft's wrapper, whose
    parameter names start with 'base_model.model.'."""
    try:
        import peft
    except ImportError:
        raise UsageError("lora: needs the peft package; pip install -e '.[hf]' (or scripts/setup hf)") from None
    targets = cfg.target_modules
    if isinstance(targets, list):
        leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name}
        missing = [t for t in targets if t not in leaf_names and not any(n.endswith(f".{t}") for n, _ in model.named_modules())]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
            raise UsageError(
                f"lora.target_modules: {', '.join(repr(m) for m in missing)} match no module of the model; linear modules: {', '.join(linear)}"
            )
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"lora: peft cannot add adapters to this model ({_reason(err)}); check lora.target_modules") from None


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def export_hf(
    model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, cfg: Config, directory: Path, chat_template: str | None = None
) -> Path:
    """Main process: a folder that from_pretrained loads as it is. A full model (config.json, safetensors, sharded
    when large, generation config, tokenizer files), or with LoRA the adapter (PeftModel.from_pretrained) and,
    with export.merge_lora, the merged model in directory/merged. `state_dict` holds the full fp32 master weights.
    `chat_template`: the template that trained (format chat), written into every exported tokenizer, so that
    apply_chat_template at inference renders conversations as training did."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = _export_dtype(cfg.export)

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}

    if cfg.lora is None:
        _save_full(model, cast(state_dict), dtype, cfg.export, directory)
    else:
        model.save_pretrained(str(directory), state_dict=cast(state_dict))  # peft keeps the adapter's tensors only
        _point_adapter_at_base(directory, cfg)
        if cfg.export.merge_lora:
            _save_full(model.get_base_model(), cast(merged_state_dict(model, state_dict)), dtype, cfg.export, directory / "merged")
            _save_tokenizer(tokenizer, directory / "merged", chat_template)
    _save_tokenizer(tokenizer, directory, chat_template)
    return directory


def _save_tokenizer(tokenizer, directory: Path, chat_template: str | None) -> None:
    if not hasattr(tokenizer, "tokenizer"):  # the byte-level tokenizer has no files to save
        return
    hf = tokenizer.tokenizer
    own, hf.chat_template = hf.chat_template, chat_template or hf.chat_template
    try:
        hf.save_pretrained(str(directory))
    finally:
        hf.chat_template = own  # the run's tokenizer stays as loaded


def _export_dtype(cfg: ExportConfig) -> torch.dtype:

    return DTYPES[cfg.dtype]


def _save_full(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, cfg: ExportConfig, directory: Path) -> None:
    tensors = _tied_as_in(model, tensors)
    config = model.config
    use_cache, config.use_cache = config.use_cache, True  # generation wants the cache; training turned it off
    try:
        model.save_pretrained(str(directory), state_dict=tensors, max_shard_size=cfg.max_shard_size)
    finally:
        config.use_cache = use_cache
    # save_pretrained records the in-memory model's dtype; the files hold export.dtype (what dtype="auto" loads)
    written = json.loads((directory / "config.json").read_text())
    written["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _tied_as_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name of one parameter (tied weights: GPT-2's lm_head and its embedding) holds one tensor, as in the model,
    so that save_pretrained stores it once and from_pretrained ties it again. A gathered state dict (DeepSpeed's
    master copies, FSDP2's) or the cast to export.dtype gives each name a copy of its own, which it would store twice."""
    first: dict[int, str] = {}
    tensors = dict(tensors)
    for name, param in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(param), name)
        if source != name and source in tensors and name in tensors:
            tensors[name] = tensors[source]
    return tensors


def _point_adapter_at_base(directory: Path, cfg: Config) -> None:
    """adapter_config.json names the base model the adapter was trained on (a local folder as an absolute path)."""
    path = directory / "adapter_config.json"
    adapter = json.loads(path.read_text())
    base = cfg.model.pretrained
    if base is not None and Path(base).is_dir():
        base = str(Path(base).resolve())
    adapter["base_model_name_or_path"] = base
    path.write_text(json.dumps(adapter, indent=2) + "\n")


def merged_state_dict(peft_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights with every adapter merged in, W + scaling * B A (transposed for GPT-2's Conv1D),
    computed in fp32 from the full state dict, so it works whatever held the weights (DDP, ZeRO-3 shards)."""

    merged = {name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): t for name, t in state_dict.items() if ".lora_" not in name}
    for name, module in peft_model.named_modules():
        if "default" not in getattr(module, "lora_A", {}):
            continue
        a, b = (state_dict[f"{name}.lora_{x}.default.weight"].float() for x in ("A", "B"))
        delta = (b @ a) * module.scaling["default"]
        key = f"{name.removeprefix(PEFT_PREFIX)}.weight"
        base = merged[key]
        merged[key] = (base.float() + (delta.T if module.fan_in_fan_out else delta)).to(base.dtype)
    return merged
