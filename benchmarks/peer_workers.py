"""One training run of a peer framework (or the exact reference), started by benchmarks/peers.py.

Usage: peer_workers.py FRAMEWORK ROWS.npz MODEL_DIR OUT_DIR --micro-batch M --accumulation K --steps N --lr LR
under torchrun (2 gloo processes) for the data-parallel peers, as one plain process for `reference`.

Every framework gets the same rows (input ids of width seq_len + 1 and their valid lengths) in the same order, the
same initial weights (the model folder, in fp32), AdamW(betas 0.9/0.95, eps 1e-8, no weight decay), a constant LR and
clipping at 1.0, and is written the way its documentation teaches. Each writes OUT_DIR/result.json (the loss it
reports per step, target tokens/s after the first step) and rank 0 the final weights to OUT_DIR/weights.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100
BETAS, EPS, MAX_NORM = (0.9, 0.95), 1e-8, 1.0


class Rows(torch.utils.data.Dataset):
    """Samples as Hugging Face models take them: input_ids and labels of the same width (the model shifts the
    labels itself), labels IGNORE_INDEX on padding and, for prompt-masked data, on the prompt."""

    def __init__(self, path: Path):
        data = np.load(path)
        self.ids = torch.from_numpy(data["input_ids"].astype(np.int64))
        self.labels = torch.from_numpy(data["labels"].astype(np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def targets_of(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def adamw(model, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)


def token_loss_sum(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def run_reference(args, dataset: Rows) -> tuple[list[float], float, torch.nn.Module]:
    """One process, one big batch per step, the loss the exact mean over the step's target tokens."""
    model = load_model(args.model)
    optimizer = adamw(model, args.lr)
    global_batch = args.micro_batch * args.accumulation * args.world_size
    losses, tokens, started = [], 0, None
    for step in range(args.steps):
        batch = dataset[slice(step * global_batch, (step + 1) * global_batch)]
        n = targets_of(batch)
        loss = token_loss_sum(model, batch) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        started, tokens = (time.perf_counter(), 0) if step == 0 else (started, tokens + n)
    return losses, tokens / (time.perf_counter() - started), model


def run_accelerate(args, dataset: Rows):
    """Accelerate's documented accumulation: `accelerator.accumulate`, the model's mean loss per micro-batch."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation, cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = load_model(args.model)
    optimizer = adamw(model, args.lr)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, tokens, started, step_loss = [], 0, None, torch.zeros(())
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            optimizer.zero_grad()
        step_loss += loss.detach()
        tokens += targets_of(batch)
        if accelerator.sync_gradients:
            losses.append(accelerator.gather(step_loss.reshape(1)).mean().item() / args.accumulation)
            step_loss.zero_()
            if len(losses) == 1:
                started, tokens = time.perf_counter(), 0
            if len(losses) == args.steps:
                break
    rate = accelerator.reduce(torch.tensor(float(tokens)), "sum").item() / (time.perf_counter() - started)
    return losses, rate, accelerator.unwrap_model(model)


def run_fabric(args, dataset: Rows):
    """Lightning Fabric's documented accumulation: `fabric.no_backward_sync` on the accumulating micro-steps, the
    model's mean loss per micro-batch divided by the accumulation steps (as Lightning's Trainer does)."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=args.world_size, strategy="ddp")
    fabric.launch()
    model = load_model(args.model)
    model, optimizer = fabric.setup(model, adamw(model, args.lr))
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, shuffle=False))
    losses, tokens, started, step_loss = [], 0, None, torch.zeros(())
    for i, batch in enumerate(loader):
        is_accumulating = (i + 1) % args.accumulation != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            loss = model(**batch).loss
            fabric.backward(loss / args.accumulation)
        step_loss += loss.detach()
        tokens += targets_of(batch)
        if not is_accumulating:
            fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(fabric.all_gather(step_loss).mean().item() / args.accumulation)
            step_loss.zero_()
            if len(losses) == 1:
                started, tokens = time.perf_counter(), 0
            if len(losses) == args.steps:
                break
    rate = fabric.all_reduce(torch.tensor(float(tokens)), reduce_op="sum").item() / (time.perf_counter() - started)
    return losses, rate, model.module if hasattr(model, "module") else model


def run_trainer(args, dataset: Rows, average_tokens_across_devices: bool):
    """HF Trainer with its defaults for the loss: the model's token-level loss given `num_items_in_batch` (the
    accumulation window's target tokens; across ranks too with average_tokens_across_devices, the default)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        """The time of each optimizer step's end, to measure throughput after the first step as the others do."""

        def __init__(self):
            self.ends = []

        def on_step_end(self, *unused, **kwargs):
            self.ends.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        max_grad_norm=MAX_NORM,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        train_sampling_strategy="sequential",
        seed=0,
        average_tokens_across_devices=average_tokens_across_devices,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    clock = StepClock()
    trainer = Trainer(model=load_model(args.model), args=training_args, train_dataset=dataset, callbacks=[clock])
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    global_batch = args.micro_batch * args.accumulation * args.world_size
    tokens = sum(targets_of(dataset[slice(s * global_batch, (s + 1) * global_batch)]) for s in range(1, args.steps))
    return losses, tokens / (clock.ends[-1] - clock.ends[0]), trainer.model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["reference", "accelerate", "fabric", "trainer", "trainer-per-rank-tokens"])
    parser.add_argument("rows")
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = Rows(Path(args.rows))
    run = {
        "reference": run_reference,
        "accelerate": run_accelerate,
        "fabric": run_fabric,
        "trainer": lambda a, d: run_trainer(a, d, True),
        "trainer-per-rank-tokens": lambda a, d: run_trainer(a, d, False),
    }[args.framework]
    losses, tokens_per_s, model = run(args, dataset)
    if int(os.environ.get("RANK", 0)) == 0:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps({"losses": losses, "tokens_per_s": tokens_per_s}))
    if torch.distributed.is_initialized():
        # DDP and the frameworks keep references to the group past its destruction; freed in the interpreter's
        # teardown, its gloo threads can abort the process (SIGABRT) after a run that succeeded: end without it
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
