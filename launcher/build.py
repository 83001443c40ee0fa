"""Everything the loop needs, built from the config in the order correctness requires:
validate input, build and freeze the bare model, join the process group, prepare data, wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn

from launcher.batches import BatchPlan
from launcher.checkpoints import load_checkpoint, resume_path
from launcher.config import Config
from launcher.data import EvalData, TrainData, prepare_splits
from launcher.diagnostics import check_backend_support, check_dump_names
from launcher.distributed import (check_hardware, deepspeed_json, env_world_size, make_accelerator, resolved_deepspeed_config,
                                  seed_initial_weights, seed_rank_streams)
from launcher.errors import UsageError
from launcher.freezing import apply_freeze, parameter_table
from launcher.models import build_model, check_model_output, describe_model
from launcher.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from launcher.optim import build_lr_schedule, build_optimizer
from launcher.outputs import check_output_dir, prepare_output_dir


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    model: nn.Module  # wrapped (DDP, compiled, ...) by accelerator.prepare
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    train_data: TrainData
    eval_data: EvalData | None
    tokenizer: ByteTokenizer | HFTokenizer
    plan: BatchPlan
    total_steps: int
    frozen: set[str]
    start_step: int = 0  # optimizer steps already done (from the checkpoint resumed)
    skipped_steps: int = 0  # fp16 overflow steps among them
    nonfinite_steps: int = 0  # steps dropped for an inf/nan loss or gradient (diagnostics.nonfinite: skip)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process


def build_bare_model(cfg: Config, tokenizer: ByteTokenizer | HFTokenizer | None = None, weights: bool = True
                     ) -> tuple[nn.Module, set[str]]:
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
    frozen = apply_freeze(model, cfg.freeze)
    check_dump_names(model, cfg.diagnostics.dump_grad)
    return model, frozen


def batch_plan(cfg: Config, processes: int) -> BatchPlan:
    """The run's batch arithmetic; with launch.simulate_world_size one process plays every rank."""
    simulated = cfg.launch.simulate_world_size
    if simulated and processes > 1:
        raise UsageError(f"launch.simulate_world_size runs one process, but {processes} were launched; start one process (launch.nproc_per_node: 1)")
    return BatchPlan(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, simulated or processes,
                     ranks_per_process=simulated or 1)


def build_run(cfg: Config, overwrite: bool = False) -> Run:
    check_hardware(cfg.train)
    check_output_dir(cfg.output_dir, overwrite, resuming=cfg.resume is not None)
    checkpoint = resume_path(cfg.resume, cfg.output_dir)
    tokenizer = load_tokenizer(cfg)
    model, frozen = build_bare_model(cfg, tokenizer)  # freezing precedes wrapping: DDP and the optimizer see only trainable params

    plan = batch_plan(cfg, env_world_size())
    check_options(cfg, uses_deepspeed=deepspeed_json(cfg.deepspeed) is not None)
    accelerator = make_accelerator(cfg.train, cfg.deepspeed, plan.micro_steps_per_process)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    train_blocks, eval_blocks = _prepare_data_main_first(cfg, accelerator, tokenizer)  # a data error leaves output_dir untouched

    pin = accelerator.device.type == "cuda"
    train_data = TrainData(train_blocks, plan, rank, cfg.seed, cfg.data.shuffle, pin, cfg.train.overfit_batches, tokenizer.pad_id)
    eval_data = None
    if eval_blocks is not None and len(eval_blocks):
        eval_mb = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        eval_data = EvalData(eval_blocks, rank, world_size, eval_mb, cfg.eval.max_samples, pin, tokenizer.pad_id)
    total_steps = plan.total_steps(len(train_data), cfg.train.max_steps, cfg.train.epochs)

    optimizer = build_optimizer(model, cfg.train)
    lr_schedule = build_lr_schedule(optimizer, cfg.train, total_steps)
    accelerator.print(parameter_table(model))
    accelerator.print(describe_model(model, cfg) + f"; tokenizer {tokenizer.name}")
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    seed_rank_streams(cfg.seed, rank)  # a resumed run then restores every rank's RNG states from the checkpoint
    state = load_checkpoint(accelerator, checkpoint, plan.global_batch_size) if checkpoint else None

    accelerator.wait_for_everyone()  # every rank has checked output_dir and the checkpoint before anything is written
    if accelerator.is_main_process:
        prepare_output_dir(cfg, overwrite, resume_step=state.step if state else None)

    accelerator.print(
        f"{backend_name(accelerator)}: {plan.describe()}; {len(train_data)} training samples of {cfg.data.seq_len} tokens,"
        f" {train_data.steps_per_epoch} steps per epoch, {total_steps} steps;"
        f" {len(eval_blocks) if eval_blocks is not None else 0} held-out samples"
    )
    if state:
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    return Run(cfg, accelerator, model, optimizer, lr_schedule, train_data, eval_data, tokenizer, plan, total_steps, frozen,
               start_step=state.step if state else 0, skipped_steps=state.skipped_steps if state else 0,
               nonfinite_steps=state.nonfinite_steps if state else 0)


def check_run_inputs(cfg: Config, world_size: int) -> tuple[dict | None, BatchPlan, nn.Module]:
    """The checks a run of `world_size` processes makes on its config, without starting it (for `launcher plan`
    and before a plain `launcher train` starts its processes): hardware, the DeepSpeed JSON, backend options,
    batch arithmetic, the model and its freeze patterns. Returns the resolved DeepSpeed config, the batch
    plan and the model on the meta device (names and shapes only, no memory)."""
    check_hardware(cfg.train)
    ds_config = resolved_deepspeed_config(cfg.deepspeed, cfg.train, world_size)
    check_options(cfg, uses_deepspeed=ds_config is not None)
    plan = batch_plan(cfg, world_size)
    return ds_config, plan, inspection_model(cfg)


def inspection_model(cfg: Config) -> nn.Module:
    """The model for names, shapes and freeze status (inspect, plan, the pre-flight): the built-in GPT and Hugging
    Face models on the meta device (no weights read, no memory); a factory's model for real, on CPU, because its
    code may not run on the meta device (a from_pretrained inside it), and so its logits are checked before any
    process starts."""
    tokenizer = load_tokenizer(cfg)
    if cfg.model.factory is not None:
        return build_bare_model(cfg, tokenizer)[0]
    with torch.device("meta"):
        return build_bare_model(cfg, tokenizer, weights=False)[0]


def check_options(cfg: Config, uses_deepspeed: bool) -> None:
    """Options that depend on the backend or on an optional package, checked before anything starts."""
    check_backend_support(cfg.diagnostics, uses_deepspeed)
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("train.tensorboard: the tensorboard package is not installed; pip install -e '.[tensorboard]' or set it to false") from None


def _prepare_data_main_first(cfg: Config, accelerator: Accelerator, tokenizer: ByteTokenizer | HFTokenizer):
    """The main process tokenizes (and caches) first; the others then read its cache.

    A data error on the main process is sent to every rank, so all exit with it instead of waiting.
    """
    result, error = None, [None]
    if accelerator.is_main_process:
        try:
            result = prepare_splits(cfg.data, cfg.seed, tokenizer, report=accelerator.print)
        except UsageError as err:
            error = [err.lines]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise UsageError(*error[0])
    return result if result is not None else prepare_splits(cfg.data, cfg.seed, tokenizer)


def backend_name(accelerator: Accelerator) -> str:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return {DistributedType.NO: "single process", DistributedType.MULTI_CPU: "DDP (gloo)"}.get(
        accelerator.distributed_type, f"DDP ({accelerator.distributed_type.value})")
