"""The memory plan against real CPU steps: predicted peak per rank, measured peak, and their ratio, per case.

Each case builds the model as a run does, trains two optimizer steps of two micro-steps each (forward, the loop's
fp32 token-sum cross-entropy, backward; AdamW foreach; gradients set to None after the step) and measures the
peak of every tensor alive (parameters, gradients, optimizer state, activations, temporaries, DDP's buckets and
FSDP2's gathered units) with launcher.memory.LiveTensorBytes (a dispatch mode that adds up the storages alive),
entered before the model is built. The prediction is
`launcher.memory.memory_table` for the same config, from the meta-device model (no weights). DDP and FSDP2 run on
2 real gloo ranks (rank 0 is measured; the ranks are symmetric up to FSDP2's padding of the last shard).

Run from the repository root (about 2 minutes on 2 CPU cores); name cases to run only those (a name's start will do):
  .venv/bin/python benchmarks/memory_plan.py
  .venv/bin/python benchmarks/memory_plan.py "GPT, FSDP2"
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.bare_model import build_bare_model, inspection_model  # noqa: E402
from launcher.config import Config  # noqa: E402
from launcher.memory import LiveTensorBytes, memory_table  # noqa: E402
from launcher.models import logits_of, transformer_blocks  # noqa: E402
from launcher.optim import build_optimizer  # noqa: E402

GPT = {"n_layer": 4, "n_head": 4, "d_model": 128}
LLAMA = {
    "hf_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
}
GPT2 = {"hf_config": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}}
LORA = {"r": 8, "target_modules": "all-linear"}
CASES = [  # name, model, extra sections, ranks, backend
    ("GPT", GPT, {}, 1, "DDP"),
    ("GPT + checkpointing", GPT | {"gradient_checkpointing": True}, {}, 1, "DDP"),
    ("Llama", LLAMA, {}, 1, "DDP"),
    ("Llama + checkpointing", LLAMA | {"gradient_checkpointing": True}, {}, 1, "DDP"),
    ("Llama + LoRA", LLAMA, {"lora": LORA}, 1, "DDP"),
    ("GPT-2", GPT2, {}, 1, "DDP"),
    ("GPT-2 + checkpointing", GPT2 | {"gradient_checkpointing": True}, {}, 1, "DDP"),
    ("GPT, DDP 2 ranks", GPT, {}, 2, "DDP"),
    ("GPT, FSDP2 2 ranks", GPT, {"fsdp": {}}, 2, "FSDP2"),
    ("Llama, FSDP2 2 ranks", LLAMA, {"fsdp": {}}, 2, "FSDP2"),
]
MICRO_BATCH, ACCUMULATION, SEQ_LEN = 4, 2, 128


def config(model: dict, extra: dict, folder: Path) -> Config:
    docs = folder / "docs.jsonl"
    docs.write_text("".join('{"text": "%s"}\n' % ("memory " * 40) for _ in range(8)))
    return Config.model_validate(
        {
            "output_dir": str(folder / "out"),
            "model": model,
            "data": {"path": str(docs), "seq_len": SEQ_LEN, "eval_fraction": 0},
            "train": {"micro_batch_size": MICRO_BATCH, "gradient_accumulation_steps": ACCUMULATION, "max_steps": 2},
            **extra,
        }
    )


def measured_peak(cfg: Config, rank: int, world_size: int) -> int:
    with LiveTensorBytes(resizes=True) as live:  # from before the model exists: its weights, buckets, shards and states all count
        model = build_bare_model(cfg)[0]
        vocab = model.lm_head.weight.shape[0] if hasattr(model, "lm_head") else model.get_output_embeddings().weight.shape[0]
        if cfg.fsdp is not None:
            from torch.distributed.fsdp import fully_shard

            for block in transformer_blocks(model):
                fully_shard(block)
            fully_shard(model, reshard_after_forward=False)
            wrapped = model
        elif world_size > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            wrapped = model
        optimizer = build_optimizer(wrapped, cfg.train)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            for micro in range(ACCUMULATION):
                last = micro == ACCUMULATION - 1
                ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN), generator=generator)
                if cfg.fsdp is not None:
                    wrapped.set_requires_gradient_sync(last)
                context = wrapped.no_sync() if world_size > 1 and cfg.fsdp is None and not last else torch.enable_grad()
                with context:
                    logits = logits_of(wrapped(ids))
                    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum")
                    loss.backward()
                del logits, loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return live.peak


def _rank(rank: int, world_size: int, cfg: Config, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        peak = measured_peak(cfg, rank, world_size)
        if rank == 0:
            out["peak"] = peak
    finally:
        dist.destroy_process_group()


def measure(cfg: Config, world_size: int) -> int:
    if world_size == 1:
        return measured_peak(cfg, 0, 1)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world_size, cfg, port, out), nprocs=world_size)
        return out["peak"]


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    print(f"micro-batch {MICRO_BATCH} x accumulation {ACCUMULATION}, seq_len {SEQ_LEN}, fp32, CPU; bytes per rank (rank 0)")
    print(f"{'case':<26} {'predicted':>12} {'measured':>12} {'ratio':>7}")
    chosen = [case for case in CASES if not sys.argv[1:] or any(case[0].startswith(arg) for arg in sys.argv[1:])]
    for name, model, extra, world_size, backend in chosen:
        with tempfile.TemporaryDirectory() as folder:
            cfg = config(model, extra, Path(folder))
            row = memory_table(cfg, inspection_model(cfg)[0], world_size, MICRO_BATCH)[backend]
            predicted = row.peak
            measured = measure(cfg, world_size)
        rows.append(predicted / measured)
        print(f"{name:<26} {predicted:>12,} {measured:>12,} {predicted / measured:>7.3f}", flush=True)
        if os.environ.get("MEMORY_PLAN_PARTS"):  # the predicted parts, to see which one is off
            print(f"  {row}")
    worst = max(abs(r - 1) for r in rows)
    print(f"worst deviation {worst:.1%} ({'within' if worst <= 0.10 else 'OUTSIDE'} 10%)")


if __name__ == "__main__":
    main()
