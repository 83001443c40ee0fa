"""Everything the loop needs, built from the config in the order correctness requires:
validate input, build and freeze the bare model, join the process group, prepare data, wrap.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from launcher.backends import Backend, backend_kind, diagnostics_problems, make_backend
from launcher.batches import BatchPlan
from launcher.checkpoints import load_checkpoint, set_aside_newer
from launcher.config import Config, DistributedConfig
from launcher.data import EvalData, TrainData, cache_root, data_identity, load_documents, prepare_splits
from launcher.diagnostics import check_dump_names
from launcher.distributed import (
    check_hardware,
    deepspeed_json,
    env_rank,
    env_world_size,
    make_accelerator,
    resolved_deepspeed_config,
    seed_initial_weights,
    seed_rank_streams,
)
from launcher.errors import Problems, RunFault, UsageError
from launcher.freezing import apply_freeze, parameter_table
from launcher.library_output import rank_log, write_library_output_to
from launcher.lock import OutputLock, describe
from launcher.models import build_model, check_model_output, describe_model, initializers_skipped
from launcher.optim import apply_hyperparameters, build_lr_schedule, build_optimizer
from launcher.outputs import FAULTS, check_storage, existing_parent, free_text, prepare_output_dir, storage_fault
from launcher.resume import Start, check_end, check_samples, plan_start
from launcher.setup_wait import setup_done, setup_key, wait_for_setup
from launcher.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    model: nn.Module  # wrapped (DDP, compiled, ...) by accelerator.prepare, or sharded by FSDP2
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    train_data: TrainData
    eval_data: EvalData | None
    tokenizer: ByteTokenizer | HFTokenizer
    plan: BatchPlan
    total_steps: int
    start_step: int = 0  # optimizer steps already done (from the checkpoint resumed)
    skipped_steps: int = 0  # fp16 overflow steps among them
    nonfinite_steps: int = 0  # steps dropped for an inf/nan loss or gradient (diagnostics.nonfinite: skip)
    lock: OutputLock | None = None  # the main process's hold on output_dir
    backend: Backend | None = None  # what differs between DDP, DeepSpeed and FSDP2 (launcher.backends)
    data_identity: dict = field(default_factory=dict)  # of the files trained on, recorded in checkpoints (main process)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process


def build_bare_model(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer | None = None, weights: bool = True) -> tuple[nn.Module, set[str]]:
    """The model with LoRA and the freeze patterns applied, on CPU, identical on every rank and world size.

    `weights=False` (under the meta device: names and shapes for inspect, plan and the pre-flight) reads no
    weights. The order: build (the tokenizer's vocabulary size decides the embedding), fit the embedding to the
    tokenizer, LoRA (peft freezes the base), then the freeze patterns."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    seed_initial_weights(cfg.seed)
    search_dirs = tuple(dict.fromkeys(d for d in (cfg.config_dir, Path.cwd()) if d is not None))
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, weights, search_dirs)
    if cfg.model.is_hf:
        from launcher.models.hf import apply_lora, fit_embeddings

        fit_embeddings(model, tokenizer.vocab_size, cfg)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
    elif weights:
        check_model_output(model, cfg.model, tokenizer.vocab_size, cfg.data.seq_len)
    problems = Problems()
    frozen = problems.check(apply_freeze, model, cfg.freeze)
    problems.check(check_dump_names, model, cfg.diagnostics.dump_grad)
    problems.report()
    return model, frozen


def batch_plan(cfg: Config, processes: int) -> BatchPlan:
    """The run's batch arithmetic; with launch.simulate_world_size one process plays every rank."""
    simulated = cfg.launch.simulate_world_size
    if simulated and processes > 1:
        raise UsageError(f"launch.simulate_world_size runs one process, but {processes} were launched; start one process (launch.nproc_per_node: 1)")
    return BatchPlan(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, simulated or processes, ranks_per_process=simulated or 1)


def build_run(
    cfg: Config, overwrite: bool = False, start: Start | None = None, checked: Checked | None = None, lock: OutputLock | None = None
) -> Run:
    """`start` (plan_start's answer) and `checked` (validate_run's) when the caller has them already. `lock`: output_dir's
    lock when the pre-flight holds it already (and decided `start` under it); else the main process takes it here."""
    lock = lock or OutputLock(cfg.output_dir)
    try:
        return _build_run(cfg, overwrite, start, checked, lock)
    except BaseException:
        lock.release()  # a run that does not start leaves output_dir free (and gone again if the lock made it)
        raise


def _build_run(cfg: Config, overwrite: bool, start: Start | None, checked: Checked | None, lock: OutputLock) -> Run:
    if checked is None:  # every problem of the input at once, before anything is written (the documents: when prepared)
        checked = validate_run(cfg, env_world_size())
    start = start or plan_start(cfg, overwrite, check_lock=env_world_size() == 1)
    try:  # before a model is loaded: output_dir and caches writable, room for a checkpoint
        check_storage_for(cfg, checked.model)
    except RunFault as err:
        err.quiet = env_rank() != 0  # every rank finds it: one report
        raise
    tokenizer, plan = checked.tokenizer, checked.plan
    # a factory's model was built for real by the validation (its code may not run on the meta device): it is the
    # run's. Freezing precedes wrapping: DDP, FSDP2 and the optimizer see only trainable parameters.
    model = checked.model if cfg.model.factory is not None else build_bare_model(cfg, tokenizer)[0]
    accelerator = make_accelerator(
        cfg.train, cfg.deepspeed, plan.micro_steps_per_process, cfg.distributed.timeout_s, cfg.output_dir, needs_process_group=cfg.fsdp is not None
    )
    backend = make_backend(accelerator, cfg)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if not lock.held():  # the same on every rank: held here only by a one-process run's pre-flight
        # the main process locks output_dir before any write (the probe below, the data caches) and decides the start
        # again under the lock: a run that started beside this one and wrote output_dir meanwhile is seen now
        start = main_first(accelerator, lambda: lock_and_plan(lock, cfg, overwrite), cfg.distributed, "taking output_dir's lock") or start
    start = agree_on_start(accelerator, cfg, start)
    checkpoint = start.checkpoint
    identity = data_identity(cfg.data) if accelerator.is_main_process else {}  # of the bytes about to be read
    train_blocks, eval_blocks = _prepare_data_main_first(cfg, accelerator, tokenizer)  # a data error leaves output_dir untouched

    pin = accelerator.device.type == "cuda"
    train_data = TrainData(train_blocks, plan, rank, cfg.seed, cfg.data.shuffle, pin, cfg.train.overfit_batches, tokenizer.pad_id)
    eval_data = None
    if eval_blocks is not None and len(eval_blocks):
        eval_mb = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        eval_data = EvalData(eval_blocks, rank, world_size, eval_mb, cfg.eval.max_samples, pin, tokenizer.pad_id)
    check_samples(start, len(train_data), cfg)
    total_steps = plan.total_steps(len(train_data), cfg.train.max_steps, cfg.train.epochs)
    check_end(start, total_steps, cfg)

    offloaded = backend.offloads_optimizer
    model = backend.shard(model)  # before the optimizer is built: it must see the parameters the backend trains (FSDP2: shards)
    optimizer = build_optimizer(model, cfg.train, cpu_adam=offloaded)
    if offloaded:
        accelerator.print(f"optimizer offloaded to the CPU: {type(optimizer).__name__}, {torch.get_num_threads()} thread(s) per process")
    lr_schedule = build_lr_schedule(optimizer, cfg.train, total_steps)
    accelerator.print(parameter_table(model))
    accelerator.print(describe_model(model, cfg) + f"; tokenizer {tokenizer.name}")
    model, optimizer = backend.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    seed_rank_streams(cfg.seed, rank)  # a resumed run then restores every rank's RNG states from the checkpoint
    state = load_checkpoint(backend, checkpoint, plan.global_batch_size) if checkpoint else None
    if state:
        apply_hyperparameters(lr_schedule, cfg.train, total_steps)  # the config's values, not the checkpoint's

    # every rank has checked output_dir and the checkpoint; the main process (holding the lock) writes first
    main_first(accelerator, lambda: open_output_dir(cfg, start), cfg.distributed, "preparing output_dir")
    write_library_output_to(cfg.output_dir, rank)  # the libraries' warnings so far, and later ones (not the console's)
    if world_size > 1:
        log_to_rank_file(cfg.output_dir, rank)
    accelerator.print(
        f"{backend.name}: {plan.describe()}; {len(train_data)} training samples of {cfg.data.seq_len} tokens,"
        f" {train_data.steps_per_epoch} steps per epoch, {total_steps} steps;"
        f" {len(eval_blocks) if eval_blocks is not None else 0} held-out samples"
    )
    accelerator.print(
        f"{world_size} process(es), {torch.get_num_threads()} CPU thread(s) each (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    for line in backend.notes:
        accelerator.print(line)
    if state:
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    for line in start.notes + ([f"changed since the checkpoint: {', '.join(start.changes)}"] if start.changes else []):
        accelerator.print(line)
    return Run(
        cfg,
        accelerator,
        model,
        optimizer,
        lr_schedule,
        train_data,
        eval_data,
        tokenizer,
        plan,
        total_steps,
        start_step=state.step if state else 0,
        skipped_steps=state.skipped_steps if state else 0,
        nonfinite_steps=state.nonfinite_steps if state else 0,
        lock=lock if accelerator.is_main_process else None,
        backend=backend,
        data_identity=identity,
    )


def agree_on_start(accelerator: Accelerator, cfg: Config, start: Start) -> Start:
    """Rank 0's start (the checkpoint to resume, or none) for every rank: no rank picks a checkpoint from its own
    listing of output_dir. First every rank checks that output_dir is the folder rank 0 sees (a file system shared
    by all nodes, not a node-local disk): rank 0 puts a probe file into it (or the nearest folder above it that
    exists), every rank looks for it, rank 0 removes it; UsageError naming the first rank that does not see it."""
    if accelerator.num_processes == 1:
        return start
    import socket
    import uuid

    from accelerate.utils import gather_object

    from launcher.distributed import first_failed_rank

    message = [None, start]
    if accelerator.is_main_process:
        probe = existing_parent(cfg.output_dir) / f".launcher-probe-{uuid.uuid4().hex}"
        try:
            probe.write_text("")
            message[0] = str(probe)
        except OSError:
            pass  # cannot write there: the storage check reports it
    broadcast_object_list(message)
    probe, start = message
    missing = first_failed_rank(accelerator, probe is not None and not Path(probe).is_file())  # a collective: all have looked
    hosts = gather_object([socket.gethostname()])
    if accelerator.is_main_process and probe is not None:
        Path(probe).unlink(missing_ok=True)
    if missing is not None:
        raise UsageError(
            f"output_dir: '{cfg.output_dir}' is not the same folder on every node: rank {missing} (on {hosts[missing]})"
            f" does not see rank 0's files there (a node-local disk?); put output_dir on a file system shared by all nodes"
        )
    return start


def log_to_rank_file(output_dir: Path, rank: int) -> None:
    """From here on, this rank's stdout and stderr also go to output_dir/logs/rank-N.log (appended across restarts)."""
    try:
        (output_dir / "logs").mkdir(exist_ok=True)
        log = open(rank_log(output_dir, rank), "a", buffering=1)
    except OSError:
        return  # a fault of output_dir is reported by the next write that needs it
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)


class _Tee:
    """A text stream writing to the console and a log file (the file without progress-bar redraws)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            try:
                self.log.write(text)
            except OSError:
                pass
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        try:
            self.log.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def take_lock(lock: OutputLock) -> None:
    """Main process: hold output_dir (UsageError while a live run holds it); a stale lock is taken over with a warning."""
    lock.acquire()
    if lock.taken_over is not None:
        print(f"launcher: warning: took over the lock of {describe(lock.taken_over)}, which is no longer running", file=sys.stderr)


def lock_and_plan(lock: OutputLock, cfg: Config, overwrite: bool) -> Start:
    """Main process under a launcher: take output_dir's lock, then decide where the run starts while holding it (and
    check the checkpoint's contents, unless the pre-flight of the `launcher train` that handed the lock over did)."""
    try:
        take_lock(lock)
    except OSError as err:  # checked writable before the model was built; it changed since
        raise storage_fault(err, existing_parent(cfg.output_dir), "opening output_dir") or err from None
    return plan_start(cfg, overwrite, check_lock=False, verify_contents=not lock.handed_over)


def open_output_dir(cfg: Config, start: Start) -> None:
    """Main process, holding the lock, the run's first writes: clear or branch the previous run, write config.yaml."""
    try:
        if start.checkpoint is not None and not start.clear:
            set_aside_newer(cfg.output_dir, start.state.step)
        prepare_output_dir(cfg, start.clear, resume_step=start.state.step if start.state else None)
    except OSError as err:
        raise storage_fault(err, cfg.output_dir, "preparing output_dir") or err from None


def check_storage_for(cfg: Config, model: nn.Module) -> None:
    """Writable output_dir and caches, and room for one checkpoint (estimated from `model`'s shapes: the inspection
    model, on the meta device where it can be)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # AdamW's two fp32 moments; DeepSpeed under bf16/fp16 also keeps fp32 master weights
    optimizer = trainable * (12 if cfg.deepspeed is not None and cfg.train.mixed_precision != "no" else 8)
    check_storage(cfg.output_dir, weights + optimizer, cache_dirs(cfg))


def cache_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """The folders data preparation writes into, each with the key or variable that moves it."""
    if cfg.data.cache_dir is not None:
        return [("data.cache_dir", cfg.data.cache_dir)]
    import datasets

    # datasets' own cache holds what load_dataset reads; LAUNCHER_CACHE the tokenized rows (and the built-in corpus)
    return [("HF_DATASETS_CACHE", Path(datasets.config.HF_DATASETS_CACHE)), ("LAUNCHER_CACHE", cache_root(cfg.data))]


def main_first(accelerator: Accelerator, work, bounds: DistributedConfig, what: str):
    """`work()` on the main process; its UsageError or RunFault is sent to every rank, so all exit with it instead of
    waiting in the next collective. Returns the main process's result (None elsewhere). The others wait for it
    outside any collective (launcher.setup_wait): a set-up longer than distributed.timeout_s is no hang."""
    result, error = None, [None]
    key = setup_key() if accelerator.num_processes > 1 else None
    if accelerator.is_main_process:
        try:
            result = work()
        except (UsageError, RunFault) as err:
            error = [(type(err).__name__, err.lines)]
        finally:
            if key is not None:
                setup_done(key)
    elif key is not None:
        wait_for_setup(key, what, accelerator.process_index, bounds.setup_timeout_s, bounds.timeout_s)
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        kind, lines = error[0]
        if kind == "UsageError":
            raise UsageError(*lines)
        raise RunFault(*lines, quiet=not accelerator.is_main_process)
    return result


@dataclass
class Checked:
    """What the validation pass built on its way: the run reuses it instead of loading or computing it again."""

    tokenizer: ByteTokenizer | HFTokenizer
    plan: BatchPlan
    deepspeed: dict | None  # the resolved DeepSpeed config ("auto" filled), if DeepSpeed runs
    model: nn.Module  # names, shapes and freeze status: on the meta device, or a factory's real model on CPU
    frozen: set[str]


def validate_run(cfg: Config, world_size: int, problems: Problems | None = None) -> Checked | None:
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
    ds_config = problems.check(resolved_deepspeed_config, cfg.deepspeed, cfg.train, world_size)
    problems.check(check_options, cfg, uses_deepspeed=deepspeed_json(cfg.deepspeed) is not None)
    plan = problems.check(batch_plan, cfg, world_size)
    tokenizer = problems.check(load_tokenizer, cfg)
    built = problems.check(inspection_model, cfg, tokenizer) if tokenizer is not None else None
    if own:
        problems.report()
    if len(problems.lines) > found_before:
        return None
    return Checked(tokenizer, plan, ds_config, *built)


def check_documents(cfg: Config) -> None:
    """The training (and evaluation) documents load: files exist, formats and fields are right."""
    problems = Problems()
    problems.check(load_documents, cfg.data)
    if cfg.data.eval_path is not None or cfg.data.eval_split is not None:
        problems.check(load_documents, cfg.data, evaluation=True)
    problems.report()


def inspection_model(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer | None = None) -> tuple[nn.Module, set[str]]:
    """The model for names, shapes and freeze status (inspect, plan, the pre-flight), with its frozen names: the
    built-in GPT and Hugging Face models on the meta device (no weights read, no memory); a factory's model for
    real, on CPU, because its code may not run on the meta device (a from_pretrained inside it), and so its logits
    are checked before any process starts."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    if cfg.model.factory is not None:
        return build_bare_model(cfg, tokenizer)
    with torch.device("meta"), initializers_skipped():
        return build_bare_model(cfg, tokenizer, weights=False)


def check_options(cfg: Config, uses_deepspeed: bool) -> None:
    """Options that depend on the backend or on an optional package, checked before anything starts."""
    problems = diagnostics_problems(backend_kind(cfg, uses_deepspeed), cfg.diagnostics)
    if uses_deepspeed:
        # Accelerate's DeepSpeed path also reads transformers' version: both are the deepspeed extra
        missing = [name for name in ("deepspeed", "transformers") if not _importable(name)]
        if missing:
            problems.append(
                f"deepspeed: DeepSpeed runs need the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, not installed here;"
                f" pip install -e '.[deepspeed]' (or scripts/setup deepspeed), or remove deepspeed to train with DDP"
            )
    if problems:
        raise UsageError(*problems)
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError(
                "train.tensorboard: the tensorboard package is not installed; pip install -e '.[tensorboard]' or set it to false"
            ) from None


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _prepare_data_main_first(cfg: Config, accelerator: Accelerator, tokenizer: ByteTokenizer | HFTokenizer):
    """The main process tokenizes (and caches) first; the others then read its cache.

    A data error on the main process is sent to every rank, so all exit with it instead of waiting.
    """
    result = main_first(accelerator, lambda: prepare_data(cfg, tokenizer, accelerator.print), cfg.distributed, "preparing the data")
    return result if result is not None else prepare_data(cfg, tokenizer)


def prepare_data(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer, report=None):
    """prepare_splits, with a cache that cannot be written (full, read-only) reported as a fault of the machine."""
    try:
        return prepare_splits(cfg.data, cfg.seed, tokenizer, report=report)
    except OSError as err:
        where = Path(err.filename).absolute() if err.filename else None
        for key, folder in cache_dirs(cfg):
            folder = folder.absolute()
            if err.errno in FAULTS and (where is None or where == folder or folder in where.parents):
                raise RunFault(
                    f"preparing the data: {FAULTS[err.errno]} writing '{where or folder}' ({free_text(existing_parent(folder))});"
                    f" free space or make it writable, or set {key} to another folder"
                ) from None
        raise
