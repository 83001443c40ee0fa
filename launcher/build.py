"""Everything the loop needs, built from the config in the order correctness requires: validate input
(launcher.validate), build and freeze the bare model (launcher.bare_model), join the process group, agree on the
start, prepare data, shard and wrap (launcher.backends).
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

from launcher.backends import Backend, make_backend
from launcher.bare_model import build_bare_model
from launcher.batches import ORDER_KINDS, BatchLayout
from launcher.checkpoints import load_checkpoint, set_aside_newer
from launcher.config import Config, DistributedConfig
from launcher.data import EvalData, TrainData, data_identity, make_mixture, prepare_splits
from launcher.distributed import env_rank, env_world_size, first_failed_rank, make_accelerator, seed_rank_streams
from launcher.errors import RunFault, UsageError
from launcher.freezing import parameter_table
from launcher.library_output import log_to_rank_file, write_library_output_to
from launcher.lock import OutputLock, describe
from launcher.models import describe_model
from launcher.optim import apply_hyperparameters, build_lr_schedule, build_optimizer
from launcher.outputs import FAULTS, existing_parent, free_text, prepare_output_dir, storage_fault
from launcher.resume import StartingPoint, check_end, check_samples, decide_start
from launcher.setup_wait import setup_done, setup_key, wait_for_setup
from launcher.tokenizer import ByteTokenizer, HFTokenizer
from launcher.validate import ValidatedRun, cache_dirs, check_storage_for, validate_run


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
    plan: BatchLayout
    total_steps: int
    backend: Backend  # what differs between DDP, DeepSpeed and FSDP2 (launcher.backends)
    start_step: int = 0  # optimizer steps already done (from the checkpoint resumed)
    skipped_steps: int = 0  # fp16 overflow steps among them
    nonfinite_steps: int = 0  # steps dropped for an inf/nan loss or gradient (diagnostics.nonfinite: skip)
    lock: OutputLock | None = None  # the main process's hold on output_dir
    data_identity: dict = field(default_factory=dict)  # of the files trained on, recorded in checkpoints (main process)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process


def build_run(
    cfg: Config, overwrite: bool = False, start: StartingPoint | None = None, checked: ValidatedRun | None = None, lock: OutputLock | None = None
) -> Run:
    """`start` (decide_start's answer) and `checked` (validate_run's) when the caller has them already. `lock`: output_dir's
    lock when the pre-flight holds it already (and decided `start` under it); else the main process takes it here."""
    lock = lock or OutputLock(cfg.output_dir)
    try:
        return _build_run(cfg, overwrite, start, checked, lock)
    except BaseException:
        lock.release()  # a run that does not start leaves output_dir free (and gone again if the lock made it)
        raise


def _build_run(cfg: Config, overwrite: bool, start: StartingPoint | None, checked: ValidatedRun | None, lock: OutputLock) -> Run:
    if checked is None:  # every problem of the input at once, before anything is written (the documents: when prepared)
        checked = validate_run(cfg, env_world_size())
    start = start or decide_start(cfg, overwrite, check_lock=env_world_size() == 1)
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
        start = main_first(accelerator, lambda: lock_and_decide_start(lock, cfg, overwrite), cfg.distributed, "taking output_dir's lock") or start
    start = agree_on_start(accelerator, cfg, start)
    checkpoint = start.checkpoint
    identity = data_identity(cfg.data) if accelerator.is_main_process else {}  # of the bytes about to be read
    train_blocks, eval_blocks = _prepare_data_main_first(cfg, accelerator, tokenizer)  # a data error leaves output_dir untouched

    pin = accelerator.device.type == "cuda"
    mixture = make_mixture(cfg.data, train_blocks, cfg.seed)  # data.sources: which rows each epoch takes
    resumed_order = (start.state.sample_order or "array") if start.state is not None else None  # a resume orders as its run did
    if resumed_order not in (None, *ORDER_KINDS):
        raise UsageError(
            f"resume: checkpoint '{checkpoint}' orders its samples as '{resumed_order}', which this launcher does not know;"
            " resume it with the launcher version that wrote it"
        )
    train_data = TrainData(
        train_blocks, plan, rank, cfg.seed, cfg.data.shuffle, pin, cfg.train.overfit_batches, tokenizer.pad_id, mixture, resumed_order
    )
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
    for line in [*backend.notes, *checked.notes, *([mixture.describe()] if mixture is not None else [])]:
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


def agree_on_start(accelerator: Accelerator, cfg: Config, start: StartingPoint) -> StartingPoint:
    """Rank 0's start (the checkpoint to resume, or none) for every rank: no rank picks a checkpoint from its own
    listing of output_dir. First every rank checks that output_dir is the folder rank 0 sees (a file system shared
    by all nodes, not a node-local disk): rank 0 puts a probe file into it (or the nearest folder above it that
    exists), every rank looks for it, rank 0 removes it; UsageError naming the first rank that does not see it."""
    if accelerator.num_processes == 1:
        return start
    import socket
    import uuid

    from accelerate.utils import gather_object

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


def take_lock(lock: OutputLock) -> None:
    """Main process: hold output_dir (UsageError while a live run holds it); a stale lock is taken over with a warning."""
    lock.acquire()
    if lock.taken_over is not None:
        print(f"launcher: warning: took over the lock of {describe(lock.taken_over)}, which is no longer running", file=sys.stderr)


def lock_and_decide_start(lock: OutputLock, cfg: Config, overwrite: bool) -> StartingPoint:
    """Main process under a launcher: take output_dir's lock, then decide where the run starts while holding it (and
    check the checkpoint's contents, unless the pre-flight of the `launcher train` that handed the lock over did)."""
    try:
        take_lock(lock)
    except OSError as err:  # checked writable before the model was built; it changed since
        raise storage_fault(err, existing_parent(cfg.output_dir), "opening output_dir") or err from None
    return decide_start(cfg, overwrite, check_lock=False, verify_contents=not lock.handed_over)


def open_output_dir(cfg: Config, start: StartingPoint) -> None:
    """Main process, holding the lock, the run's first writes: clear or branch the previous run, write config.yaml."""
    try:
        if start.checkpoint is not None and not start.clear:
            set_aside_newer(cfg.output_dir, start.state.step)
        prepare_output_dir(cfg, start.clear, resume_step=start.state.step if start.state else None)
    except OSError as err:
        raise storage_fault(err, cfg.output_dir, "preparing output_dir") or err from None


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
