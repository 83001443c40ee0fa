"""The run configuration: typed sections, loaded from YAML plus dotted `key=value` overrides.

Validation is pydantic's; this module only turns its errors into one line per problem that names
the key and the fix, and checks the cross-field rules a single field cannot express.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, field_validator, model_validator

from launcher.errors import UsageError

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# on a field: its value may differ from the resumed checkpoint's without resume_allow_changes, because it does not
# change what a step computes (the global batch is checked on its own: its split into micro-batch x accumulation x
# world size may change); on a section field: every key of the section
FREE_ON_RESUME = {"free_on_resume": True}


class Section(BaseModel):
    # a non-finite number trains nothing (an inf learning rate is nan weights after one step)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic reads true as 1: `max_steps: true` would train one step
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is not a number; give a number")
        if isinstance(value, (str, Path)) and (info.field_name in PATH_TEXT_FIELDS or _takes_paths(cls.model_fields[info.field_name].annotation)):
            return shell_path(str(value))
        return value


# fields holding a path in a string (they also take a hub id or a word such as 'auto'; neither changes when expanded)
PATH_TEXT_FIELDS = ("pretrained", "tokenizer", "chat_template", "resume")
NAME_MAX, PATH_MAX = 255, 4095  # Linux's limits on one name and a whole path, in bytes


def shell_path(text: str) -> str:
    """A path as a shell would read it for the person who wrote it: `~` and `~user` expanded, `$VAR` and `${VAR}`
    replaced (an unset variable is refused: a shell would make it empty, and the path something else). Names too long
    for the file system are refused here, before any file call meets them (ENAMETOOLONG)."""
    unset = [name for name in re.findall(r"\$\{?(\w+)\}?", text) if name not in os.environ]
    if unset:
        raise ValueError(f"'{text}' uses ${unset[0]}, which is not set in this environment; set it, or write the path out")
    path = os.path.expanduser(os.path.expandvars(text))
    longest = max(path.split("/"), key=lambda name: len(name.encode()))
    if len(longest.encode()) > NAME_MAX:
        raise ValueError(
            f"the name '{longest[:40]}...' in '{path[:80]}...' has {len(longest.encode())} bytes, over the file system's {NAME_MAX}; use a shorter name"
        )
    if len(path.encode()) > PATH_MAX:
        raise ValueError(f"the path '{path[:80]}...' has {len(path.encode())} bytes, over the system's {PATH_MAX}; use a shorter path")
    for above in Path(path).parents:
        if above.exists():
            if not above.is_dir():  # nothing can be made (or found) under a regular file: bad input, not a fault of the disk
                raise ValueError(f"'{path}' lies under '{above}', which is a file; give a path under a folder")
            break
    return path


def _takes_paths(annotation) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _takes_numbers(annotation) -> bool:
    """An int or float field that does not also take a bool."""
    kinds = set()

    def collect(a):
        kinds.add(a)
        for arg in typing.get_args(a):
            collect(arg)

    collect(annotation)
    return bool(kinds & {int, float}) and bool not in kinds


class TrainConfig(Section):
    micro_batch_size: int | Literal["auto"] = Field(
        8,
        description="samples per process per micro-step; auto: the largest that fits the memory budget (needs global_batch_size)",
        json_schema_extra=FREE_ON_RESUME,
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-steps per optimizer step (set by micro_batch_size: auto)", json_schema_extra=FREE_ON_RESUME
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="samples per optimizer step; micro_batch_size: auto splits it; null: micro-batch x accumulation x world size",
        json_schema_extra=FREE_ON_RESUME,
    )
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="GB (10^9 bytes) per rank that micro_batch_size: auto may plan for; null: the GPU's memory",
        json_schema_extra=FREE_ON_RESUME,
    )
    max_steps: int | None = Field(
        None, ge=0, description="optimizer steps to run; 0 writes the initial weights and exits", json_schema_extra=FREE_ON_RESUME
    )
    epochs: int | None = Field(None, ge=1, description="upper bound on passes over the training split", json_schema_extra=FREE_ON_RESUME)
    learning_rate: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices and embeddings (not biases or norms)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of the peak (cosine, linear)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the total gradient norm to this; null disables clipping")
    grad_norm_type: float = Field(2.0, gt=0, allow_inf_nan=True, description="p of the p-norm used for clipping and logging (inf allowed)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast precision; fp16 adds a loss scaler")
    compile: bool = Field(False, description="torch.compile the model", json_schema_extra=FREE_ON_RESUME)
    log_every: int = Field(
        10, ge=1, description="optimizer steps between metrics rows (each costs one host-device sync)", json_schema_extra=FREE_ON_RESUME
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="peak dense TFLOP/s of one device, for the mfu metric; null: from a table of known GPUs (none on CPU)"
    )
    tensorboard: bool = Field(
        False,
        description="also write the metrics as TensorBoard event files to output_dir/tensorboard (the tensorboard extra)",
        json_schema_extra=FREE_ON_RESUME,
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers that also get every metrics row (each its extra): tensorboard, wandb, mlflow",
        json_schema_extra=FREE_ON_RESUME,
    )
    overfit_batches: int | None = Field(
        None, ge=1, description="train on the first N optimizer steps' batches over and over (the can-it-learn check); null: all data"
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_or_auto(cls, n: int | str) -> int | str:
        if isinstance(n, int) and n < 1:
            raise ValueError(f"input should be 1 or more (got {n}); set train.micro_batch_size to 1 or more, or auto")
        return n

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class GenerateConfig(Section):
    prompts: list[str] | None = Field(
        None, min_length=1, description="the prompts, as text (format chat: each one a user turn); null: the first eval.generate.n held-out samples"
    )
    n: int = Field(2, ge=1, description="prompts taken from the evaluation set when eval.generate.prompts is null")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per prompt (fewer when the model writes EOS)")


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="optimizer steps between evaluations; null: only at the end")
    at_start: bool = Field(True, description="also evaluate the initial weights (step 0)")
    micro_batch_size: int | None = Field(None, ge=1, description="samples per process per eval batch; null: train.micro_batch_size")
    max_samples: int | None = Field(None, ge=1, description="evaluate on the first N held-out samples only; null: all")
    generate: GenerateConfig | None = Field(
        None, description="at each evaluation, also write the model's greedy answers to prompts to output_dir/samples.jsonl; null: none"
    )


class SourceConfig(Section):
    """One source of a data.sources mixture: its files, its share, and the data.* keys it sets for itself (null: data's)."""

    path: Path = Field(description="a data file, folder, glob or save_to_disk folder, as data.path takes")
    weight: float | None = Field(None, gt=0, description="sampling weight: the source's share of the target tokens is weight / sum of weights")
    epochs: float | None = Field(None, gt=0, description="instead of weight: passes over the source per epoch of the mixture (e.g. 2, or 0.5)")
    format: Literal["text", "prompt_completion", "chat"] | None = Field(None, description="data.format for this source")
    split: str | None = Field(None, min_length=1, description="data.split for this source (a DatasetDict save_to_disk folder)")
    text_field: str | None = Field(None, min_length=1, description="data.text_field for this source")
    prompt_field: str | None = Field(None, min_length=1, description="data.prompt_field for this source")
    completion_field: str | None = Field(None, min_length=1, description="data.completion_field for this source")
    messages_field: str | None = Field(None, min_length=1, description="data.messages_field for this source")
    too_long: Literal["truncate", "drop"] | None = Field(None, description="data.too_long for this source")

    @field_validator("path")
    @classmethod
    def _existing_path(cls, path: Path) -> Path:
        try:
            return DataConfig._existing_data(path)
        except ValueError as err:  # a source has no built-in corpus to fall back to
            raise ValueError(str(err).removesuffix(", or null for the built-in corpus")) from None

    @property
    def data_keys(self) -> dict:
        """The data.* keys this source sets for itself."""
        return {key: value for key, value in self if key not in ("weight", "epochs") and value is not None}


class DataConfig(Section):
    path: Path | None = Field(
        None,
        description="a .txt/.jsonl/.json/.csv/.parquet file, a folder of such files or a glob, or a save_to_disk folder; null: the built-in corpus;"
        " format tokens: a .bin token shard, a folder or a glob of them",
    )
    name: str | None = Field(
        None, min_length=1, description="instead of path: a dataset for datasets.load_dataset (a hub name, or a local folder of data files)"
    )
    config: str | None = Field(None, min_length=1, description="the configuration of data.name (load_dataset's second argument)")
    split: str = Field("train", min_length=1, description="the split to train on, for data.name and a DatasetDict save_to_disk folder")
    eval_path: Path | None = Field(None, description="a separate evaluation set, in any form data.path takes; replaces the held-out fraction")
    eval_split: str | None = Field(
        None, min_length=1, description="a split of data.name (or of a DatasetDict folder) to evaluate on; replaces the held-out fraction"
    )
    format: Literal["text", "prompt_completion", "chat", "tokens"] = Field(
        "text",
        description="text: every token is a target; prompt_completion: only the completion; chat: only assistant turns (data.train_on);"
        " tokens: token shards NAME.bin + NAME.idx (docs/guides/pretraining-data.md), packed as text",
    )
    text_field: str = Field("text", min_length=1, description="column holding the text (format text)")
    prompt_field: str = Field("prompt", min_length=1, description="column holding the prompt (format prompt_completion)")
    completion_field: str = Field("completion", min_length=1, description="column holding the completion (format prompt_completion)")
    messages_field: str = Field("messages", min_length=1, description="column holding the conversation, a list of {role, content} (format chat)")
    message_fields: dict[Literal["role", "content"], str] = Field(
        default_factory=dict, description="format chat: the message keys holding role and content, e.g. {role: from, content: value} (ShareGPT)"
    )
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict, description="format chat: the data's roles as system/user/assistant/tool, e.g. {human: user, gpt: assistant} (ShareGPT)"
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        description="format chat: null: the tokenizer's own template (byte-level: 'default'); a name (chatml, qwen, llama3, mistral, gemma,"
        " default); or a .jinja file. Written into the exported tokenizer",
    )
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="format chat: the loss counts assistant turns, every token, or the last assistant turn only"
    )
    train_field: str | None = Field(
        None,
        min_length=1,
        description="format chat: a message key (e.g. train, weight) whose false/0 takes that turn out of the loss and true/1 puts it in",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate",
        description="prompt_completion and chat samples longer than seq_len + 1 tokens: cut the end off, or drop the sample (both counted)",
    )
    seq_len: int = Field(128, ge=2, description="tokens per training sequence")
    pack: bool = Field(True, description="several documents (samples) per row; false: one padded row per document chunk (sample)")
    separate_documents: bool = Field(
        False,
        description="formats text and tokens, packed: positions restart at each document, a token attends only within its document"
        " (block-diagonal causal mask) and a document's first token is not a target; false: both run on across documents (GPT-2)",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="fraction of documents held out for evaluation; 0 disables evaluation")
    shuffle: bool = Field(True, description="reshuffle the training samples every epoch (seeded)")
    num_proc: int | None = Field(None, ge=1, description="processes that tokenize; null: one per CPU core (up to 8) from 10,000 rows on, else 1")
    cache_dir: Path | None = Field(
        None, description="where tokenized data is cached; null: ~/.cache/launcher (or $LAUNCHER_CACHE)", json_schema_extra=FREE_ON_RESUME
    )
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="instead of path/name: a mixture, each source {path, weight or epochs, per-source data keys}"
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _existing_data(cls, path: Path | None) -> Path | None:
        if path is None or path.is_dir():
            return path
        if any(c in str(path) for c in "*?["):
            if not glob.glob(str(path), recursive=True):
                raise ValueError(f"the pattern '{path}' matches no file; check the folder and the pattern")
            return path
        if path.suffix not in (*DATA_SUFFIXES, ".bin"):  # .bin: a token shard (data.format: tokens)
            raise ValueError(f"'{path}' has an unsupported suffix; use one of {', '.join(DATA_SUFFIXES)}, a folder or a glob (or a .bin token shard)")
        if not path.is_file():
            raise ValueError(f"file '{path}' not found; point it at an existing file, or null for the built-in corpus")
        return path

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.path is not None and self.name is not None:
            raise ValueError("data.path and data.name both choose the training data; keep one of them")
        if self.config is not None and self.name is None:
            raise ValueError("data.config is the configuration of data.name; set data.name or remove data.config")
        if self.eval_path is not None and self.eval_split is not None:
            raise ValueError("data.eval_path and data.eval_split both choose the evaluation set; keep one of them")
        if self.format == "tokens" and (self.path is None or not self.pack):
            raise ValueError("data.format tokens reads token shards from data.path, packed; set data.path and data.pack: true")
        if (self.eval_path is not None or self.eval_split is not None) and "eval_fraction" in self.model_fields_set and self.eval_fraction:
            raise ValueError("data.eval_fraction holds out training documents, but data.eval_path/eval_split gives an evaluation set; remove one")
        if self.sources is not None:
            check_sources(self)
        unread = [f"data.{key}" for key in changed(self, FORMAT_FIELDS) if self.format not in FORMAT_FIELDS[key]]
        if unread:
            raise ValueError(
                f"{', '.join(unread)}: not read with data.format: {self.format}; remove {'them' if len(unread) > 1 else 'it'}, or set data.format"
            )
        if self.separate_documents and not self.pack:
            raise ValueError(
                "data.separate_documents keeps packed documents apart; with data.pack: false each row holds one document already: remove it"
            )
        return self

    @property
    def has_eval_set(self) -> bool:
        return self.eval_path is not None or self.eval_split is not None or self.eval_fraction > 0


def check_sources(cfg: DataConfig) -> None:
    """data.sources: no other training source beside it, weights or epochs given alike, each key read by its format."""
    if cfg.path is not None or cfg.name is not None:
        raise ValueError(f"data.{'path' if cfg.path is not None else 'name'} and data.sources both choose the training data; keep one of them")
    if cfg.eval_split is not None:
        raise ValueError(
            "data.eval_split: a mixture has no one split to evaluate; give data.eval_path, or hold out data.eval_fraction of each source"
        )
    shares = [("weight" if s.weight is not None else "") + ("epochs" if s.epochs is not None else "") for s in cfg.sources]
    if len(set(shares)) > 1 or shares[0] not in ("weight", "epochs"):
        raise ValueError(
            "data.sources: give every source a weight (its share of tokens), or every source epochs (passes per epoch); not both, not mixed"
        )
    for i, source in enumerate(cfg.sources):
        form = source.format or cfg.format
        unread = [f"data.sources.{i}.{key}" for key in source.data_keys if key in FORMAT_FIELDS and form not in FORMAT_FIELDS[key]]
        if unread:
            raise ValueError(
                f"{', '.join(unread)}: not read with format {form}; remove {'them' if len(unread) > 1 else 'it'}, or set that source's format"
            )


# the data formats that read each field: a field of another format is refused rather than silently ignored
FORMAT_FIELDS = {
    "text_field": ("text",),
    "prompt_field": ("prompt_completion",),
    "completion_field": ("prompt_completion",),
    "messages_field": ("chat",),
    "chat_template": ("chat",),
    "train_on": ("chat",),
    "message_fields": ("chat",),
    "roles": ("chat",),
    "train_field": ("chat",),
    "too_long": ("prompt_completion", "chat"),
    "separate_documents": ("text", "tokens"),  # prompt_completion and chat samples are always kept apart in a row
}


def changed(section: BaseModel, names) -> list[str]:
    """The fields among `names` given a value other than their default (a run's config.yaml, which lists every field
    with its value, loads back as a config)."""
    fields = type(section).model_fields
    return [
        name for name in names if name in section.model_fields_set and getattr(section, name) != fields[name].get_default(call_default_factory=True)
    ]


BUILTIN_GPT_KEYS = ("n_layer", "n_head", "d_model", "dropout")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def folder_or_hub_id(value: str | None, what: str, needs: str | None = None) -> str | None:
    """A local folder (holding `needs`, when given), or a name a model hub could resolve ('org/name'). A path
    that does not exist is a hub id only if it has a hub id's shape and no local folder of its start exists."""
    if value is None:
        return None
    path = Path(value)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"'{value}' is a file; point it at {what} folder")
        if needs is not None and not (path / needs).is_file():
            raise ValueError(f"'{value}' is not {what} folder (no {needs}); point it at a folder written by save_pretrained")
        return value
    if HUB_ID.fullmatch(value) and not Path(value.split("/")[0]).is_dir():
        return value  # a hub id: resolved when the model is loaded, where a hub is reachable
    raise ValueError(f"folder '{value}' not found; point it at {what} folder")


class ModelConfig(Section):
    pretrained: str | None = Field(
        None, min_length=1, description="a Hugging Face model folder (or a hub id, where a hub is reachable): AutoModelForCausalLM with its weights"
    )
    hf_config: Path | dict[str, Any] | None = Field(
        None,
        description="a Hugging Face architecture trained from scratch: a folder with config.json, or a mapping with model_type (an inline one without vocab_size takes the tokenizer's)",
    )
    factory: str | None = Field(
        None,
        description="'module:callable' building your own model (its module beside the config file, in the working directory or on PYTHONPATH), called with vocab_size, seq_len and model.factory_kwargs; its forward takes input_ids and returns logits (or an object with .logits); null: the built-in GPT",
    )
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for model.factory")
    n_layer: int = Field(4, ge=1, description="built-in GPT: transformer blocks")
    n_head: int = Field(4, ge=1, description="built-in GPT: attention heads per block")
    d_model: int = Field(128, ge=1, description="built-in GPT: width of the residual stream")
    dropout: float = Field(0.0, ge=0, lt=1, description="built-in GPT: dropout probability (0 keeps the forward deterministic)")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the trained weights: fp32 master weights (mixed precision from train.mixed_precision), or bf16 for pure 16-bit training",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward (less memory, about a third more compute)")
    resize_embeddings: bool = Field(
        False, description="grow the embedding (and output) rows to the tokenizer's size when it has more ids than the model"
    )

    @field_validator("factory")
    @classmethod
    def _module_colon_callable(cls, factory: str | None) -> str | None:
        if factory is not None and factory.count(":") != 1:
            raise ValueError(f"'{factory}' is not of the form 'module:callable'")
        return factory

    @field_validator("pretrained")
    @classmethod
    def _model_folder(cls, value: str | None) -> str | None:
        return folder_or_hub_id(value, "a Hugging Face model", needs="config.json")

    @field_validator("hf_config")
    @classmethod
    def _folder_or_mapping(cls, value):
        if isinstance(value, dict) and not isinstance(value.get("model_type"), str):
            raise ValueError("an inline mapping needs model_type (e.g. llama, gpt2, qwen2), as in a config.json")
        if isinstance(value, Path) and not (value / "config.json").is_file():
            raise ValueError(
                f"'{value}' is not a folder with a config.json; point it at a Hugging Face model folder or give a mapping with model_type"
            )
        return value

    @property
    def source(self) -> str:
        """Which kind of model: 'pretrained', 'hf_config', 'factory' or 'builtin'."""
        return next((key for key in ("pretrained", "hf_config", "factory") if getattr(self, key) is not None), "builtin")

    @property
    def is_hf(self) -> bool:
        return self.source in ("pretrained", "hf_config")

    @model_validator(mode="after")
    def _one_model_source(self) -> ModelConfig:
        given = [f"model.{key}" for key in ("pretrained", "hf_config", "factory") if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both choose the model; keep one of them")
        builtin_set = [f"model.{key}" for key in changed(self, BUILTIN_GPT_KEYS)]
        if given and builtin_set:
            raise ValueError(f"{', '.join(builtin_set)}: only for the built-in GPT, but {given[0]} chooses another model; remove them")
        if not given and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_head ({self.n_head})")
        return self


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="rank of the low-rank update")
    alpha: float = Field(16, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (the last part, e.g. [q_proj, v_proj]) that get adapters, or all-linear"
    )

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module (e.g. [q_proj, v_proj]) or use all-linear")
        return value


class ExportConfig(Section):
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="dtype of the exported weights (taken from the fp32 master weights)")
    merge_lora: bool = Field(False, description="with lora: also write final/merged/, the base with the adapters merged in")
    max_shard_size: str = Field("5GB", description="Hugging Face exports: largest safetensors file before sharding (e.g. 2GB)")


class DiagnosticsConfig(Section):
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="on an inf/nan loss or gradient: stop (exit 3, checkpoints before it kept) or skip the step (one host-device sync per step)",
    )
    grad_norms_every: int | None = Field(
        None, ge=1, description="log pre-clip gradient norms per layer to metrics.jsonl every N optimizer steps; null: never"
    )
    dump_grad: list[str] = Field(
        default_factory=list, description="parameter names whose gradient statistics are printed and logged (DDP or one process)"
    )
    dump_grad_steps: list[PositiveInt] = Field(
        default_factory=list, description="optimizer steps (1-based) at which dump_grad prints; empty: every train.log_every steps"
    )
    detect_anomaly: bool = Field(
        False, description="torch.autograd anomaly detection: the backward op that made a nan, with its forward trace (slow)"
    )


class FsdpConfig(Section):
    reshard_after_forward: bool = Field(
        True,
        description="free each block's gathered parameters after its forward (gathered again for the backward): less memory, one more all-gather per block",
        json_schema_extra=FREE_ON_RESUME,
    )
    sync_every_micro_step: bool | Literal["auto"] = Field(
        False,
        description="reduce-scatter after every micro-step instead of the window's last (the same numbers; k x the communication, sharded instead of full accumulated gradients in memory); auto: true only when false does not fit the memory budget",
        json_schema_extra=FREE_ON_RESUME,
    )
    cpu_offload: bool = Field(
        False,
        description="keep the parameter shards, their gradients and the optimizer state in CPU memory (the optimizer steps on the CPU)",
        json_schema_extra=FREE_ON_RESUME,
    )


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="optimizer steps between checkpoints (and one at the end); null: only on preemption")
    every_minutes: float | None = Field(
        None,
        gt=0,
        description="also checkpoint at the end of the first step that starts this many minutes after the last one (agreed by all ranks); null: 30 inside a SLURM job, else off",
    )
    keep_last: int | None = Field(None, ge=1, description="keep the newest N checkpoints; null: keep all")


class LaunchConfig(Section):
    nproc_per_node: int | Literal["auto"] = Field(
        1, description="processes a plain `launcher train` starts (auto: every GPU, or 2 CPU processes); ignored under accelerate launch/torchrun"
    )
    simulate_world_size: int | None = Field(
        None, ge=1, description="one process reproduces the global batch and updates of an N-process DDP run (N x the micro-steps); null: off"
    )

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, n: int | str) -> int | str:
        if isinstance(n, int) and n < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return n


class DistributedConfig(Section):
    timeout_s: float = Field(
        600, gt=0, description="seconds a collective may wait before the run fails with a timeout (DDP and DeepSpeed; a hung rank, GPU or node)"
    )
    hang_report_s: float = Field(
        120,
        gt=0,
        description="seconds without progress on every rank, some waiting in a collective, before the hang report names the rank behind (off when not below timeout_s)",
    )
    setup_timeout_s: float = Field(
        7200, gt=0, description="seconds the other ranks wait, outside any collective, for the main process's set-up (data preparation, output_dir)"
    )
    straggler_factor: float = Field(
        1.5, gt=1, description="a rank whose compute per step is this many times the other ranks' median is a straggler (metrics at log steps)"
    )
    straggler_intervals: int = Field(3, ge=1, description="log intervals in a row a rank must straggle before the one warning line names it")
    straggler_min_lag_s: float = Field(
        0.25,
        ge=0,
        description="seconds per step a straggler must cost the others, beyond the median, to be named (below it: a loaded host's noise, or the main process's logging at log_every 1)",
    )


class WandbConfig(Section):
    project: str = Field("launcher", min_length=1, description="the W&B project of the run")
    entity: str | None = Field(None, min_length=1, description="the W&B team or user; null: the account's default")
    name: str | None = Field(None, min_length=1, description="the W&B run's display name; null: output_dir's folder name")
    tags: list[str] = Field(default_factory=list, description="tags of the W&B run")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under output_dir/wandb to `wandb sync` later (no network); online: to the W&B server"
    )


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="http(s)://host:port, sqlite:///path.db, file:///folder or postgresql://...; null: sqlite in output_dir/mlflow.db",
    )
    experiment: str = Field("launcher", min_length=1, description="the MLflow experiment (created when missing)")
    run_name: str | None = Field(None, min_length=1, description="the MLflow run's name; null: output_dir's folder name")


SEED_MAX = 2**31 - 1  # numpy seeds take 32 bits, and each rank adds its rank to the seed


class Config(Section):
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds initial weights and data order (identical across world sizes)")
    output_dir: Path = Field(Path("outputs/run"), description="where config.yaml, metrics.jsonl and final/ go", json_schema_extra=FREE_ON_RESUME)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, json_schema_extra=FREE_ON_RESUME)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="a Hugging Face tokenizer folder (AutoTokenizer); null: model.pretrained's folder, else the built-in byte-level tokenizer",
    )
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters (peft) instead of the full model, e.g. {r: 8, alpha: 16}; Hugging Face models only"
    )
    export: ExportConfig = Field(default_factory=ExportConfig)
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter-name patterns to freeze: globs on dotted names (blocks.0.*), or 're:' and a regex matching the whole name; each must match something, and freezing everything is refused; with lora they apply after peft froze the base",
    )
    deepspeed: Path | None = Field(None, description="DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) to train with DeepSpeed; null: DDP")
    fsdp: FsdpConfig | None = Field(
        None, description="train with FSDP2 (fully_shard per transformer block), with these options; {} for the defaults; null: DDP"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, json_schema_extra=FREE_ON_RESUME)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig, json_schema_extra=FREE_ON_RESUME)
    resume: str | None = Field(
        None,
        min_length=1,
        description="'auto': the newest complete checkpoint in output_dir (none: start fresh); or a checkpoint folder",
        json_schema_extra=FREE_ON_RESUME,
    )
    resume_allow_changes: list[str] = Field(
        default_factory=list,
        description="keys (or sections) whose values may differ from the resumed checkpoint's, e.g. [train.learning_rate]; the new values take effect",
        json_schema_extra=FREE_ON_RESUME,
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, json_schema_extra=FREE_ON_RESUME)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, json_schema_extra=FREE_ON_RESUME)
    launch: LaunchConfig = Field(default_factory=LaunchConfig, json_schema_extra=FREE_ON_RESUME)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, json_schema_extra=FREE_ON_RESUME)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_folder(cls, value: str | None) -> str | None:
        return folder_or_hub_id(value, "a Hugging Face tokenizer")

    @field_validator("deepspeed")
    @classmethod
    def _existing_json(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file '{path}' not found; point it at a JSON such as configs/deepspeed/zero2.json, or null for DDP")
        return path

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        if self.train.max_steps is None and self.train.epochs is None:
            raise ValueError("set train.max_steps or train.epochs (or both: the smaller bound wins)")
        if self.train.micro_batch_size == "auto" and self.train.global_batch_size is None:
            raise ValueError("train.micro_batch_size: auto splits train.global_batch_size, which is not set; set train.global_batch_size")
        if self.launch.simulate_world_size and self.launch.nproc_per_node != 1:
            raise ValueError("launch.simulate_world_size runs one process; set launch.nproc_per_node to 1")
        if self.launch.simulate_world_size and self.deepspeed is not None:
            raise ValueError("launch.simulate_world_size simulates DDP; unset deepspeed (ZeRO matches DDP's updates)")
        if self.lora is not None and not self.model.is_hf:
            raise ValueError("lora: needs a Hugging Face model; set model.pretrained (or model.hf_config), or remove lora")
        if self.export.merge_lora and self.lora is None:
            raise ValueError("export.merge_lora: there is no lora section to merge; remove export.merge_lora or add lora")
        if self.fsdp is not None:
            if self.deepspeed is not None:
                raise ValueError("fsdp and deepspeed both choose the backend; keep one of them")
            if self.launch.simulate_world_size:
                raise ValueError("launch.simulate_world_size simulates DDP; remove fsdp (FSDP2 matches DDP's updates)")
            if self.train.mixed_precision == "fp16":
                raise ValueError("train.mixed_precision: fp16 needs a sharded loss scaler, which fsdp does not set up; use bf16")
            if self.train.compile:
                raise ValueError("train.compile: not available with fsdp; set train.compile to false")
        unused_eval = [
            f"eval.{key}" for key in changed(self.eval, ("every_steps", "micro_batch_size", "max_samples", "generate"))
        ]  # at_start: false agrees
        if unused_eval and not self.data.has_eval_set:
            raise ValueError(
                f"{', '.join(unused_eval)}: there is no evaluation set (data.eval_fraction is 0, no data.eval_path or eval_split);"
                f" hold out documents with data.eval_fraction, or remove {'them' if len(unused_eval) > 1 else 'it'}"
            )
        if self.eval.generate is not None and (self.fsdp is not None or self.deepspeed is not None):
            raise ValueError(
                f"eval.generate: not available with {'fsdp' if self.fsdp is not None else 'deepspeed'} (each generated token would need"
                " every rank's forward); remove eval.generate, or train with DDP"
            )
        if changed(self.diagnostics, ["dump_grad_steps"]) and not self.diagnostics.dump_grad:
            raise ValueError(
                "diagnostics.dump_grad_steps: says when to print diagnostics.dump_grad, which names no parameter; name one, or remove it"
            )
        if changed(self.export, ["max_shard_size"]) and not self.model.is_hf:
            raise ValueError(
                "export.max_shard_size: only Hugging Face exports are sharded (the built-in GPT writes one model.safetensors); remove it"
            )
        if self.model.dtype == "bf16" and self.deepspeed is not None:
            raise ValueError(
                "model.dtype: bf16 is pure 16-bit training; DeepSpeed keeps its own fp32 master weights: use train.mixed_precision: bf16 and model.dtype: fp32"
            )
        return self

    @property
    def config_dir(self) -> Path | None:
        """The folder of the YAML file this config was read from (model.factory modules are found there too)."""
        return self._config_dir

    _config_dir: Path | None = PrivateAttr(None)

    def __eq__(self, other) -> bool:  # the same run, wherever the YAML was read from
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    __hash__ = None

    @field_validator("resume_allow_changes")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        unknown = [key for key in keys if not _is_config_key(key.split("."))]
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; name config keys or sections, such as train.learning_rate or data")
        return keys


def _is_config_key(loc: list[str]) -> bool:
    """`loc` names a section or a field of the config."""
    return _section_at(loc) is not None or _field_at(loc) is not None


def load_config(path: str | Path, overrides: list[str] = (), job_values: bool = False) -> Config:
    """Read a YAML file, apply `dotted.key=value` overrides, validate; raise UsageError listing every problem.
    `job_values`: fill the SLURM placeholders ({job_id}, {array_task_id}, ...) in string values."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file '{path}' not found; pass the path of a YAML file such as configs/default.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKey as err:
        raise UsageError(f"{path}: key '{err.key}' is given twice (lines {err.first_line} and {err.line}); keep one of them") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{at} ({problem}); fix the syntax there") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    # top-level `x-` keys hold YAML anchors for merge keys (`x-defaults: &d {...}`, then `<<: *d`), as in Compose files
    raw = {key: value for key, value in raw.items() if not (isinstance(key, str) and key.startswith("x-"))}
    problems = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except UsageError as err:
            problems += err.lines
    if problems:
        raise UsageError(*problems)
    if job_values:
        raw = _fill_placeholders(raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise UsageError(*(_explain(path, e) for e in err.errors())) from None
    config._config_dir = path.resolve().parent
    return config


# a value such as output_dir=runs/{array_task_id} gives each task of a SLURM job array its own folder
PLACEHOLDERS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID"}


def _fill_placeholders(raw):
    """Every string value with {job_id}, {array_job_id} or {array_task_id} replaced by the SLURM job's value."""
    import os

    if isinstance(raw, dict):
        return {key: _fill_placeholders(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_fill_placeholders(value) for value in raw]
    if not isinstance(raw, str):
        return raw
    for name, variable in PLACEHOLDERS.items():
        if "{" + name + "}" in raw:
            if not os.environ.get(variable):
                what = "a SLURM job array (sbatch --array)" if "array" in name else "a SLURM job"
                raise UsageError(f"'{raw}': {{{name}}} is filled only inside {what} ({variable} is not set); give a plain value")
            raw = raw.replace("{" + name + "}", os.environ[variable])
    return raw


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges a mapping (flattened by the base class); its keys are not duplicates
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override '{item}' is not of the form dotted.key=value (e.g. train.max_steps=100)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override '{item}': '{'.'.join(parents[: i + 1])}' is not a section")
    node[leaf] = value


def _explain(path: Path, error: dict) -> str:
    """One line for one pydantic error: the key, what is wrong, and the fix."""
    # pydantic appends the union member it tried ('int', "literal['auto']") to the location
    loc = [str(p) for p in error["loc"] if not str(p).startswith(("literal[", "int", "float", "function-"))]
    key = ".".join(loc) or "(top level)"
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        parent_model = _section_at(loc[:-1])
        known = list(parent_model.model_fields) if parent_model else []
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(loc[:-1] + close)}'?" if close else f"known keys here: {', '.join(known)}"
        return f"{path}: unknown key '{key}'; {hint}"
    if kind == "missing":
        return f"{path}: {key} is required; add it"
    if kind == "value_error":
        return f"{path}: {key}: {error['msg'].removeprefix('Value error, ')}"
    field = _field_at(loc)
    desc = f" ({field.description})" if field is not None and field.description else ""
    fixes = {
        "greater_than_equal": lambda: f"set {key} to {ctx.get('ge')} or more",
        "greater_than": lambda: f"set {key} to more than {ctx.get('gt')}",
        "less_than_equal": lambda: f"set {key} to {ctx.get('le')} or less",
        "less_than": lambda: f"set {key} to less than {ctx.get('lt')}",
        "literal_error": lambda: f"set {key} to one of {ctx.get('expected')}",
        "finite_number": lambda: f"set {key} to a finite number",
    }
    fix = fixes.get(kind, lambda: f"set {key} to a valid value{desc}")()
    return f"{path}: {key}: {error['msg'].lower()} (got {got!r}); {fix}"


def _section_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if part.isdigit():
            continue  # an item of a list of sections (data.sources.0)
        field = model.model_fields.get(part)
        # an optional section (lora, fsdp) is `Section | None`; a list of sections (data.sources) `list[Section] | None`
        annotation = getattr(field, "annotation", None)
        args = typing.get_args(annotation)
        kinds = [a for a in (annotation, *args, *(x for a in args for x in typing.get_args(a))) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not kinds:
            return None
        model = kinds[0]
    return model


def _field_at(loc: list[str]):
    section = _section_at(loc[:-1]) if loc else None
    return section.model_fields.get(loc[-1]) if section else None


def to_yaml(config: Config) -> str:
    """The resolved config, as written to OUTPUT_DIR/config.yaml (loads back to the same Config)."""
    data = config.model_dump(mode="json")
    if math.isinf(config.train.grad_norm_type):
        data["train"]["grad_norm_type"] = float("inf")
    return yaml.safe_dump(data, sort_keys=False)


def sections_and_fields(model: type[BaseModel] = None, prefix: str = ""):
    """(dotted key, field, its section class or None) of every field, depth first in declaration order; a section
    field (train, lora, fsdp, ...) comes before its own keys, and a list of sections (data.sources) before the keys
    of its items (data.sources[].path)."""
    for name, info in (model or Config).model_fields.items():
        key = prefix + name
        kinds = [info.annotation, *typing.get_args(info.annotation)]
        section = next((a for a in kinds if isinstance(a, type) and issubclass(a, Section)), None)
        items = next((typing.get_args(a)[0] for a in kinds if typing.get_origin(a) is list and _is_section(typing.get_args(a)[0])), None)
        yield key, info, section
        if section is not None:
            yield from sections_and_fields(section, key + ".")
        elif items is not None:
            yield from sections_and_fields(items, key + "[].")


def _is_section(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def free_on_resume_keys() -> tuple[str, ...]:
    """The keys (and whole sections) whose values may change on resume without resume_allow_changes (FREE_ON_RESUME)."""
    return tuple(key for key, info, _ in sections_and_fields() if (info.json_schema_extra or {}).get("free_on_resume"))


def flatten_keys(values: dict, prefix: str = "") -> dict:
    """A nested mapping (a config as YAML or JSON) as {dotted.key: value}; an empty mapping is a value."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
