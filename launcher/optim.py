"""AdamW over the trainable parameters only, and an LR schedule counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from launcher.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """Weight decay on matrices and embeddings; none on biases and norm weights (1-D); frozen parameters left out.
    `cpu_adam` (DeepSpeed with the optimizer offloaded to the CPU): DeepSpeed's CPU Adam, the same AdamW update in
    vectorized C++ on OMP_NUM_THREADS threads, several times faster than torch's there."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [  # "decays" tells the groups apart after a resume (apply_hyperparameters)
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay, "decays": True},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "decays": False},
    ]
    if cpu_adam:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                [g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, adamw_mode=True
            )
        except Exception as err:  # noqa: BLE001 - its C++ extension is built on first use (a compiler, ninja, headers)
            import sys

            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
            print(
                f"launcher: warning: DeepSpeed's CPU Adam cannot be built here ({reason}); the offloaded optimizer"
                f" runs torch's AdamW on the CPU instead (the same update, several times slower)",
                file=sys.stderr,
            )
    # foreach=True: one fused kernel launch per group instead of one per tensor, on CPU and GPU
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        foreach=True,
    )


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR for the optimizer step after `step` successful steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step that was taken (not per micro-step, not per rank, not on fp16 skips)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def apply_hyperparameters(schedule: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, total_steps: int) -> None:
    """After a resume: the config's optimizer and schedule values replace the checkpoint's (loading a state dict
    restores the old ones), so that a changed learning rate, schedule or run length is the next step's.

    The LR is recomputed as LambdaLR computes it (peak x factor at the step reached), so an unchanged config
    gives the checkpoint's values bit for bit."""
    schedule.base_lrs = [cfg.learning_rate for _ in schedule.optimizer.param_groups]
    for group in schedule.optimizer.param_groups:
        decays = group.get("decays", group["weight_decay"] != 0.0)  # checkpoints from before the tag
        group.update(
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            initial_lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay if decays else 0.0,
            lr=cfg.learning_rate * lr_factor(schedule.last_epoch, total_steps, cfg),
        )
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
