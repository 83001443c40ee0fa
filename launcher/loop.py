"""The training loop and evaluation.

Loss normalization: the gradient of an optimizer step is the gradient of the mean loss over every
target token of the step's global batch (all micro-steps, all ranks, padding excluded). The token
count is known on every rank before the step from the sample lengths, so each micro-step backward
uses `sum_of_token_losses * scale` with

    scale = accumulation * world_size / global_target_tokens

which undoes `Accelerator.backward`'s division by the accumulation steps and DDP's mean over
ranks. A partial last window, short micro-batches and padded rows are all exact this way.
"""

from __future__ import annotations

import errno
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from launcher.agreement import StepAgreement
from launcher.build import Run
from launcher.checkpoints import TrainerState, save_checkpoint
from launcher.config import CheckpointConfig, to_yaml
from launcher.data import IGNORE_INDEX, Batch, trained_template
from launcher.diagnostics import GradNorms, NonFiniteWatch, format_stats, gradient_stats, is_dump_step, layer_norms
from launcher.distributed import first_failed_rank
from launcher.errors import RunFault
from launcher.exits import RunOutcome
from launcher.final import WEIGHTS, final_dir, write_final
from launcher.flops import Mfu, make_mfu
from launcher.generate import write_generations
from launcher.hang import mark
from launcher.metrics import MetricsLog, peak_memory_gb
from launcher.models import logits_of
from launcher.models.hf import export_hf, is_hf_model
from launcher.outputs import save_weights, storage_fault
from launcher.preemption import PreemptionFlag
from launcher.stragglers import Stragglers
from launcher.trackers import open_trackers, uses_tensorboard


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's target tokens, in fp32."""
    # position ids only for rows packed with several samples: they restart at each sample (models.gpt and Hugging Face
    # models then attend within a sample only)
    output = model(batch.input_ids) if batch.position_ids is None else model(batch.input_ids, position_ids=batch.position_ids)
    logits = logits_of(output)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def zero_loss_backward(run: Run) -> None:
    """One backward of a loss of 0 (no target token), communicated once like a step's last micro-step; it changes no
    weight, gradient, optimizer state or RNG stream (the backend's before_first_step may ask for it)."""
    acc, width = run.accelerator, run.cfg.data.seq_len
    empty = Batch(
        torch.zeros(1, width, dtype=torch.long, device=acc.device), torch.full((1, width), IGNORE_INDEX, dtype=torch.long, device=acc.device)
    )
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), run.backend.micro_step(run.model, is_sync=True):
        acc.backward(token_loss_sum(run.model, empty))
    run.optimizer.zero_grad(set_to_none=True)


def train(run: Run, preemption: PreemptionFlag | None = None) -> RunOutcome:
    """Run optimizer steps from `run.start_step` to `run.total_steps`; evaluate, log, checkpoint, write the final weights.

    With `preemption`, a signal on any rank stops every rank at the same step boundary, after a checkpoint.
    An inf/nan loss or gradient stops the run (no checkpoint after it) or skips the step, per diagnostics.nonfinite.
    """
    acc, model, optimizer, cfg, backend = run.accelerator, run.model, run.optimizer, run.cfg, run.backend
    tensorboard = cfg.output_dir / "tensorboard" if uses_tensorboard(cfg.train) else None
    mfu, mfu_line = make_mfu(
        acc.unwrap_model(model), cfg.data.seq_len, acc.device, cfg.train.mixed_precision, cfg.train.peak_tflops, acc.num_processes
    )
    acc.print(mfu_line)  # before the progress bar starts drawing
    facts = {"world_size": acc.num_processes, "global_batch_size": run.plan.global_batch_size, "backend": backend.name}
    facts["trainable_parameters"] = sum(p.numel() for p in acc.unwrap_model(model).parameters() if p.requires_grad)
    trackers = open_trackers(cfg, run.start_step, facts) if acc.is_main_process else None  # W&B, MLflow: one run per output_dir
    metrics = MetricsLog(cfg.output_dir / "metrics.jsonl", acc.is_main_process, run.total_steps, run.start_step, tensorboard, trackers=trackers)
    names, params = map(list, zip(*[(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]))
    micro_steps = run.plan.micro_steps_per_process  # gradient_accumulation_steps x the ranks this process plays
    if preemption is not None:
        preemption.connect(cfg.distributed.timeout_s)
    first_eval = last_eval = None
    if run.eval_data is not None and cfg.eval.at_start and run.start_step == 0 and run.total_steps > 0:
        first_eval = last_eval = log_eval(run, metrics, step=0)

    model.train()
    local_norms = backend.local_gradient_norms(params)  # DDP: its comm hook, before any backward
    backend.before_first_step(lambda: zero_loss_backward(run))  # DDP: settles its gradient buckets
    watch = NonFiniteWatch(names, acc.process_index, acc.device, cfg.train.mixed_precision == "fp16", local_norms, backend.no_local_norms)
    optimizer.zero_grad(set_to_none=True)
    steps_done, skipped_steps, nonfinite_steps = run.start_step, run.skipped_steps, run.nonfinite_steps
    interval, preempted, requeue, nonfinite = LogInterval(acc.device, mfu), False, False, None
    checkpoint = None  # the newest this run saved
    clock = CheckpointClock(cfg.checkpoint.every_minutes)
    stragglers = Stragglers(acc, cfg.distributed)  # per-rank compute time, gathered at log steps
    agreement = StepAgreement(preemption)
    for step in range(run.start_step, run.total_steps):
        mark("data", step + 1)  # launcher.hang's record: plain attribute writes, no sync
        # the stop flags, a failed metrics write and rank 0's clock go out as the step starts and are read at its end:
        # the step hides the CPU all-reduce, whose latency grows with the ranks (launcher.agreement)
        agreement.start(metrics.fault is not None, clock.due() and acc.is_main_process)
        window = run.train_data.window(step)
        scale = micro_steps * run.plan.processes / window.global_target_tokens
        lr = run.lr_schedule.get_last_lr()[0]
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)  # this rank's loss sum; stays on the device
        for k, micro in enumerate(window.micro_batches):
            is_sync = k == micro_steps - 1
            # gradients accumulate locally; they are all-reduced (FSDP2: reduce-scattered) once, in the window's last backward,
            # the only micro-step on which the optimizer (and DeepSpeed's engine) may step
            with backend.micro_step(model, is_sync):
                mark("forward")
                loss_sum = token_loss_sum(model, micro.to(acc.device))
                mark("backward")
                acc.backward(loss_sum * scale)
            step_loss += loss_sum.detach()  # no sync per micro-step
        steps_done = step + 1
        is_log_step = steps_done % cfg.train.log_every == 0 or steps_done == run.total_steps
        mark("optimizer")
        backend.unscale()  # fp16: the loss scale divided out (the scaler's inf check); a no-op otherwise
        norms = backend.gradient_norms(params, cfg.train.grad_norm_type)  # pre-clip, global over the ranks; logged
        bad = watch.record(steps_done, step_loss, norms)  # device-side: no sync
        inspect_gradients(run, metrics, names, params, norms, steps_done)
        backend.clip(params, cfg.train.max_grad_norm, norms)  # the synced gradients, before the step (DeepSpeed clipped already)
        if cfg.diagnostics.nonfinite == "skip" and watch.current_is_bad(acc, bad):  # one sync per step
            backend.drop_step()  # fp16: the scaler is reset for the next step
            report_dropped_step(acc, watch.current_report(acc))
            nonfinite_steps += 1
        else:
            optimizer.step()
            if optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped it; the schedule must not advance
                skipped_steps += 1
            else:
                run.lr_schedule.step()
            interval.add_loss(step_loss, window.global_target_tokens)
        optimizer.zero_grad(set_to_none=True)
        interval.add_step(window.global_target_tokens)
        metrics.advance()

        told = None  # a log step: the boundary's stop flags, summed over the ranks with the loss
        if is_log_step:  # the only host-device syncs of a training step, once per log interval
            flags = agreement.flags(metrics.fault is not None)
            # the stop flags and each rank's compute time ride in the loss reduction: one collective per log interval
            row, summed = interval.flush(acc, flags + stragglers.own_time(interval.steps))  # own_time before the flush's reset
            told, straggler_row = summed[: len(flags)], stragglers.row(summed[len(flags) :])
            metrics.write(
                {
                    "step": steps_done,
                    "epoch": step // run.train_data.steps_per_epoch,
                    **straggler_row,
                    **row,
                    "lr": lr,
                    "grad_norm": float(norms.total),
                    "skipped_steps": skipped_steps,
                    "nonfinite_steps": nonfinite_steps,
                }
            )
        due = checkpoint_due(cfg.checkpoint, steps_done, run.total_steps)
        # a signal on any rank, rank 0's clock, a failed metrics write on the main process: the same answer on every rank
        agreed = agreement.settle(metrics.fault is not None, told)
        preempted, requeue, faulted, due = agreed.stop, agreed.requeue, agreed.fault, due or agreed.time_due
        if faulted:  # a full disk, a vanished output_dir: stop with the newest complete checkpoint as it is
            raise write_fault(run, metrics.fault, "metrics.jsonl")
        if cfg.diagnostics.nonfinite == "stop" and (is_log_step or due or preempted) and (nonfinite := watch.first_bad(acc)):
            preempted = requeue = False  # diverged: no checkpoint of the bad weights, no requeue; the newest checkpoint is good
            break
        if run.eval_data is not None and cfg.eval.every_steps and steps_done % cfg.eval.every_steps == 0:
            last_eval = log_eval(run, metrics, steps_done)
        if preempted or due:
            checkpoint = save_run_checkpoint(run, steps_done, skipped_steps, nonfinite_steps, metrics.fault, trackers and trackers.run_ids())
            clock.saved()
        if preempted:
            break

    outcome = RunOutcome(
        steps_done, skipped_steps, nonfinite_steps, nonfinite, preempted, requeue, checkpoint, first_eval_loss=first_eval and first_eval[1]
    )
    if not preempted and nonfinite is None:
        if run.eval_data is not None and run.total_steps > 0 and (last_eval is None or last_eval[0] != run.total_steps):
            last_eval = log_eval(run, metrics, run.total_steps)
        outcome.weights = save_final_weights(run, metrics.fault)
        outcome.eval_loss = last_eval and last_eval[1]
    if run.train_data.mixture is not None and steps_done > run.start_step:  # data.sources: what the steps sampled, against the plan
        acc.print(run.train_data.mixture.describe_sampled(f"steps {run.start_step + 1}-{steps_done}"))
        metrics.write({"step": steps_done, "mixture_sampled": run.train_data.mixture.sampled()})
    if trackers is not None:
        trackers.end({"preempted": preempted, "eval_loss": outcome.eval_loss, "final": outcome.weights and str(outcome.weights)})
    metrics.close()
    return outcome


def checkpoint_due(cfg: CheckpointConfig, steps_done: int, total_steps: int) -> bool:
    """Every `every_steps` optimizer steps and at the end, when checkpointing is on."""
    return cfg.every_steps is not None and (steps_done % cfg.every_steps == 0 or steps_done == total_steps)


class CheckpointClock:
    """checkpoint.every_minutes: due for the first step that starts that many minutes after the last checkpoint (or the
    start), saved at that step's end; only rank 0's clock counts, and the ranks agree on it with the stop signals."""

    def __init__(self, every_minutes: float | None):
        self.every_s = every_minutes * 60 if every_minutes else None
        self.saved()

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self.last >= self.every_s


def inspect_gradients(run: Run, metrics: MetricsLog, names, params, norms: GradNorms, step: int) -> None:
    """Per-layer norms and named gradients, at the steps diagnostics.* asks for (each a host-device sync)."""
    cfg = run.cfg.diagnostics
    if cfg.grad_norms_every and step % cfg.grad_norms_every == 0:
        metrics.write({"step": step, "grad_norm_by_layer": layer_norms(names, norms, run.cfg.train.grad_norm_type)})
    if is_dump_step(cfg, step, run.cfg.train.log_every):
        by_name = dict(zip(names, params))
        stats = {name: gradient_stats(run.backend.full_gradient(by_name[name])) for name in cfg.dump_grad}
        for name, values in stats.items():
            run.accelerator.print(format_stats(name, by_name[name].shape, step, values))
        metrics.write({"step": step, "grad": stats})


def report_dropped_step(acc, report: list[str]) -> None:
    """diagnostics.nonfinite: skip: no optimizer step, no schedule step; the gradients are zeroed after."""
    if acc.is_main_process:  # tqdm.write keeps the lines clear of the progress bar
        tqdm.write("\n".join(f"launcher: warning: {line}" for line in report), file=sys.stderr)


class LogInterval:
    """Loss, throughput, MFU and peak GPU memory since the last metrics row; the loss sum stays on the device until flushed."""

    def __init__(self, device: torch.device, mfu: Mfu | None = None):
        self.device, self.mfu = device, mfu
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()
        peak_memory_gb(device)  # the first interval's peak starts here, not at model building

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.loss_tokens, self.target_tokens, self.steps, self.started_s = 0, 0, 0, time.perf_counter()

    def add_loss(self, step_loss: torch.Tensor, global_target_tokens: int) -> None:
        """A step whose update was applied (a dropped non-finite step is not averaged in)."""
        self.loss_sum += step_loss
        self.loss_tokens += global_target_tokens

    def add_step(self, global_target_tokens: int) -> None:
        self.target_tokens += global_target_tokens
        self.steps += 1

    def flush(self, acc, riders: list[int]) -> tuple[dict, list[float]]:
        """The row since the last flush, and `riders` (a few counts) summed over the ranks in the same reduction."""
        packed = torch.cat([self.loss_sum.view(1), torch.tensor(riders, dtype=torch.float64, device=self.device)])
        loss_sum, *riders = acc.reduce(packed, reduction="sum").tolist()  # one collective and one sync per interval
        elapsed_s = time.perf_counter() - self.started_s
        row = {
            "loss": loss_sum / self.loss_tokens if self.loss_tokens else math.nan,
            "tokens_per_s": self.target_tokens / elapsed_s,
            "s_per_step": elapsed_s / self.steps,
        }
        if self.mfu is not None:
            row["mfu"] = self.mfu.of(row["tokens_per_s"])
        row.update(peak_memory_gb(self.device))  # this process's GPU; nothing on CPU
        self.reset()
        return row, riders


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over every held-out target token, exact across ranks; the training mode is restored."""
    model = run.model
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=run.accelerator.device)
        for batch in run.eval_data:
            mark("eval")
            loss_sum += token_loss_sum(model, batch.to(run.accelerator.device))
        return run.accelerator.reduce(loss_sum, reduction="sum").item() / run.eval_data.target_tokens
    finally:
        model.train(was_training)


def save_run_checkpoint(
    run: Run, steps_done: int, skipped_steps: int, nonfinite_steps: int, pending: BaseException | None, trackers: dict | None = None
) -> Path:
    """Every rank, at a step boundary: the checkpoint of the state after `steps_done` steps (atomic; a failed write on
    any rank ends every rank with the fault, `pending` one of this step's that already failed); returns its folder."""
    cfg, plan = run.cfg, run.plan
    mark("checkpoint")
    state = TrainerState(
        steps_done,
        steps_done // run.train_data.steps_per_epoch,
        skipped_steps,
        plan.global_batch_size,
        plan.processes,
        run.backend.name,
        nonfinite_steps,
        data=run.data_identity,
        train_samples=len(run.train_data),
        backend_kind=run.backend.kind.value,
        trackers=trackers or {},
        sample_order=run.train_data.sample_order,
    )

    def fault(err: BaseException):
        return storage_fault(err, cfg.output_dir, f"checkpoint of step {steps_done}")

    return save_checkpoint(run.accelerator, run.backend, cfg.output_dir, state, to_yaml(cfg), cfg.checkpoint.keep_last, fault, pending)


def log_eval(run: Run, metrics: MetricsLog, step: int) -> tuple[int, float]:
    eval_loss = evaluate(run)
    metrics.write({"step": step, "eval_loss": eval_loss, "eval_tokens": run.eval_data.target_tokens})
    # eval.generate: the main process's answers to samples.jsonl (a failed write stops the run like one of metrics.jsonl)
    metrics.fault = metrics.fault or write_generations(run, step, metrics.tensorboard)
    return step, eval_loss


def save_final_weights(run: Run, pending: BaseException | None = None):
    """Full, unwrapped weights (gathered from every rank where they are sharded), written by the main process.
    `pending`: a write that already failed (the last metrics rows): the run ends on it instead."""
    acc = run.accelerator
    mark("export")
    state_dict = run.backend.full_state_dict()  # a collective where the weights are sharded
    path, error, bare = None, None, acc.unwrap_model(run.model, keep_torch_compile=False)
    if run.is_main_process:
        try:
            if pending is not None:
                raise pending
            if run.lock is not None and not run.lock.held():  # output_dir deleted under the run: do not make a new one
                raise FileNotFoundError(errno.ENOENT, "output_dir vanished", str(run.cfg.output_dir))
            path = final_dir(run.cfg.output_dir)
            if is_hf_model(bare):  # a folder from_pretrained loads (or a LoRA adapter), with the tokenizer
                write_final(
                    path,
                    run.cfg,
                    lambda folder: export_hf(bare, state_dict, run.tokenizer, run.cfg, folder, trained_template(run.cfg.data, run.tokenizer)),
                )
            else:
                write_final(path, run.cfg, lambda folder: save_weights(state_dict, folder))
                path = path / WEIGHTS
        except Exception as err:  # noqa: BLE001 - a fault of the machine, or a bug (re-raised by write_fault)
            error = err
    if first_failed_rank(run.accelerator, error is not None) is not None:  # also the barrier before any rank exits
        raise write_fault(run, error, "final weights")
    return path


def write_fault(run: Run, error: BaseException | None, what: str) -> BaseException:
    """What every rank raises when a write of the main process failed: the main process the fault's one line (or
    the error itself, a bug), the others a quiet RunFault."""
    if error is None:
        return RunFault(f"{what}: a write failed on the main process", quiet=True)
    return storage_fault(error, run.cfg.output_dir, what) or error
