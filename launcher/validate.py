"""The one validation pass of a run, called by `launcher train` (every process, and the pre-flight before processes
start), `launcher plan` and `launcher inspect`: every independent check runs, and one UsageError names every problem.
Also the checks that need more than the config: the documents (reading them writes into the caches) and the storage
(output_dir and caches writable, room for a checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from launcher.backends import backend_kind, backend_problems
from launcher.backends.deepspeed import deepspeed_json, resolved_deepspeed_config
from launcher.bare_model import inspection_model
from launcher.batches import BatchLayout
from launcher.config import Config
from launcher.data import cache_root, load_documents
from launcher.data.mixture import source_config
from launcher.distributed import check_hardware
from launcher.errors import Problems, UsageError
from launcher.memory import checkpoint_bytes, resolve_auto
from launcher.outputs import check_storage
from launcher.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from launcher.trackers import tracker_problems


def batch_layout(cfg: Config, processes: int) -> BatchLayout:
    """The run's batch arithmetic; with launch.simulate_world_size one process plays every rank."""
    simulated = cfg.launch.simulate_world_size
    if simulated and processes > 1:
        raise UsageError(f"launch.simulate_world_size runs one process, but {processes} were launched; start one process (launch.nproc_per_node: 1)")
    plan = BatchLayout(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, simulated or processes, ranks_per_process=simulated or 1)
    if cfg.train.global_batch_size not in (None, plan.global_batch_size):
        raise UsageError(
            f"train.global_batch_size: {cfg.train.global_batch_size}, but {plan.describe()}; set train.micro_batch_size: auto"
            f" to split it, or make the product equal"
        )
    return plan


def check_storage_for(cfg: Config, model: nn.Module) -> None:
    """Writable output_dir and caches, and room for one checkpoint (estimated from `model`'s shapes: the inspection
    model, on the meta device where it can be)."""
    check_storage(cfg.output_dir, checkpoint_bytes(model, cfg.deepspeed is not None, cfg.train.mixed_precision), cache_dirs(cfg))


def cache_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """The folders data preparation writes into, each with the key or variable that moves it."""
    if cfg.data.cache_dir is not None:
        return [("data.cache_dir", cfg.data.cache_dir)]
    import datasets

    # datasets' own cache holds what load_dataset reads; LAUNCHER_CACHE the tokenized rows (and the built-in corpus)
    return [("HF_DATASETS_CACHE", Path(datasets.config.HF_DATASETS_CACHE)), ("LAUNCHER_CACHE", cache_root(cfg.data))]


@dataclass
class ValidatedRun:
    """What the validation pass built on its way: the run reuses it instead of loading or computing it again."""

    tokenizer: ByteTokenizer | HFTokenizer
    plan: BatchLayout
    deepspeed: dict | None  # the resolved DeepSpeed config ("auto" filled), if DeepSpeed runs
    model: nn.Module  # names, shapes and freeze status: on the meta device, or a factory's real model on CPU
    frozen: set[str]
    notes: list[str] = field(default_factory=list)  # what was decided automatically (micro_batch_size: auto), to print


def validate_run(cfg: Config, world_size: int, problems: Problems | None = None) -> ValidatedRun | None:
    """The one validation pass of a run of `world_size` processes, called by `launcher train` (every process, and
    the pre-flight before processes start), `launcher plan` and `launcher inspect`: hardware, the DeepSpeed JSON,
    backend options, batch arithmetic, the tokenizer, the model and its freeze patterns and gradient names (the
    documents are checked by `check_documents`, after the storage check: reading them writes into the caches).
    Every independent check runs; one UsageError names every problem. With `problems` given, they are added
    there instead (the caller checks more, then reports), and None is returned when there are any."""
    own = problems is None
    problems = problems if problems is not None else Problems()
    found_before = len(problems.lines)
    problems.check(check_hardware, cfg.train)
    # an automatic micro-batch (or FSDP2 sync) is decided from the model's shapes first: the batch checks need it
    auto = cfg.train.micro_batch_size == "auto" or (cfg.fsdp is not None and cfg.fsdp.sync_every_micro_step == "auto")
    ds_config = plan = None
    if not auto:
        ds_config = problems.check(resolved_deepspeed_config, cfg.deepspeed, cfg.train, world_size)
    problems.check(check_options, cfg, uses_deepspeed=deepspeed_json(cfg.deepspeed) is not None)
    if not auto:
        plan = problems.check(batch_layout, cfg, world_size)
    tokenizer = problems.check(load_tokenizer, cfg)
    built = problems.check(inspection_model, cfg, tokenizer) if tokenizer is not None else None
    notes = []
    if auto and built is not None:
        notes = problems.check(resolve_auto, cfg, built[0], simulated_or(cfg, world_size)) or []
        if not (cfg.train.micro_batch_size == "auto" or (cfg.fsdp is not None and cfg.fsdp.sync_every_micro_step == "auto")):
            ds_config = problems.check(resolved_deepspeed_config, cfg.deepspeed, cfg.train, world_size)
            plan = problems.check(batch_layout, cfg, world_size)
    if own:
        problems.report()
    if len(problems.lines) > found_before:
        return None
    return ValidatedRun(tokenizer, plan, ds_config, *built, notes=notes)


def simulated_or(cfg: Config, world_size: int) -> int:
    """The ranks the batch is split over: launch.simulate_world_size's, or the processes'."""
    return cfg.launch.simulate_world_size or world_size


def check_documents(cfg: Config) -> None:
    """The training (and evaluation) documents load: files exist, formats and fields are right."""
    problems = Problems()
    for i in range(len(cfg.data.sources or ())):  # a mixture: each source as it will be read
        problems.check(load_documents, source_config(cfg.data, i))
    if cfg.data.sources is None:
        problems.check(load_documents, cfg.data)
    if cfg.data.eval_path is not None or cfg.data.eval_split is not None:
        problems.check(load_documents, cfg.data, evaluation=True)
    problems.report()


def check_options(cfg: Config, uses_deepspeed: bool) -> None:
    """Options that depend on the backend or on an optional package, checked before anything starts."""
    problems = backend_problems(backend_kind(cfg, uses_deepspeed), cfg.diagnostics)
    problems += tracker_problems(cfg)  # train.tensorboard, train.trackers: packages installed, tracking URI well formed
    if problems:
        raise UsageError(*problems)
