"""The memory plan: `launcher plan --json`, the peak checked against a GPU, and `train.micro_batch_size: auto`,
which splits a fixed global batch by the predicted peak and so trains the same weights as any explicit split."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from launcher.memory import LiveTensorBytes, traced_activations
from launcher.models import logits_of
from launcher.models.gpt import GPT

from conftest import check, final_weights, run_cli, tiny_config, write_config

LLAMA_3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def test_traced_activations_equal_a_real_micro_step():
    """The meta-device trace against the same micro-step on CPU, measured with the model and its gradients made
    inside the accounting (as the benchmark does): the same bytes, with and without gradient checkpointing. Each
    nn.Linear's weight.t() is a view of a weight; the trace once counted it as a new tensor (12% more here)."""
    for checkpointing in (False, True):
        torch.manual_seed(0)
        with LiveTensorBytes() as live:
            model = GPT(vocab_size=257, seq_len=64, n_layer=2, n_head=2, d_model=32, gradient_checkpointing=checkpointing)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            held = live.now
            live.peak = 0
            ids = torch.randint(0, 257, (2, 64))
            logits = logits_of(model(ids))
            F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum").backward()
            del logits
        real = live.peak - held  # the batch included
        assert traced_activations(model, 2, 64) == (real, 2 * 64 * 257 * 12)


def test_live_bytes_follow_a_storage_resized_in_place():
    """FSDP2 frees a unit's gathered parameters by resizing their storage to 0 bytes, which no operator reports:
    with `resizes`, the next tensor made re-reads the live storages' sizes."""
    with LiveTensorBytes(resizes=True) as live:
        gathered = torch.empty(1000)
        gathered.untyped_storage().resize_(0)
        later = torch.empty(10)
        assert live.now == 40 and live.peak == 4000
        gathered.untyped_storage().resize_(4000)
        del later
        one = torch.empty(1)  # noqa: F841 - held while the sizes are read
        assert live.now == 4004 and live.peak == 4004


def plan_json(config: Path, *args: str) -> dict:
    return json.loads(check(run_cli("plan", str(config), "--json", *args)).stdout)


def test_plan_json_and_fit(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    plan = plan_json(config, "--gpus-per-node", "2", "--compare-backends", "--gpu-memory-gb", "0.001")
    assert (plan["world_size"], plan["global_batch_size"], plan["micro_batch_size"], plan["gradient_accumulation_steps"]) == (2, 8, 2, 2)
    assert plan["backend"] == "DDP" and set(plan["memory"]) == {"DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2"}
    ddp = plan["memory"]["DDP"]
    # 42,752 fp32 parameters (the tiny GPT's table): whole on every rank, their gradients, two moments, and DDP's
    # buckets (a second copy of the gradients); the peak is a later micro-step's (everything held, plus activations)
    assert (ddp["parameters"], ddp["gradients"], ddp["optimizer"], ddp["buffers"]) == (171008, 171008, 342016, 171008)
    assert ddp["peak"] == 171008 * 5 + ddp["activations"] and ddp["activations"] > ddp["logits"] > 0
    # 2 samples x 32 tokens x vocab 257: fp32 logits, the log-softmax the loss saves, and the logits' gradient
    assert ddp["logits"] == 2 * 32 * 257 * 12
    assert plan["device"]["fits"] is False and plan["device"]["margin"] == 10**6 - ddp["peak"]
    assert any(s.startswith("  train.micro_batch_size=1 ") for s in plan["device"]["suggestions"])
    roomy = plan_json(config, "--gpus-per-node", "2", "--gpu", "h100")
    assert roomy["device"]["name"] == "H100" and roomy["device"]["fits"] is True and "suggestions" not in roomy["device"]


def test_auto_micro_batch_trains_the_explicit_runs_weights(tmp_path: Path):
    explicit = tiny_config(tmp_path, train={"micro_batch_size": 1, "gradient_accumulation_steps": 4, "max_steps": 3})
    peaks = {}
    for micro in (2, 4):
        sized = write_config(
            tmp_path / f"m{micro}.yaml",
            explicit | {"train": explicit["train"] | {"micro_batch_size": micro, "gradient_accumulation_steps": 4 // micro}},
        )
        peaks[micro] = plan_json(sized, "--gpus-per-node", "2")["memory"]["DDP"]["peak"]
    budget_gb = (peaks[2] + peaks[4]) / 2 / 1e9  # room for micro-batch 2, not 4
    auto = dict(explicit, output_dir=str(tmp_path / "auto"))
    auto["train"] = explicit["train"] | {"micro_batch_size": "auto", "global_batch_size": 8, "memory_budget_gb": budget_gb}
    auto_config = write_config(tmp_path / "auto.yaml", auto)
    planned = plan_json(auto_config, "--gpus-per-node", "2")
    assert (planned["micro_batch_size"], planned["gradient_accumulation_steps"]) == (2, 2) and planned["memory"]["DDP"]["peak"] == peaks[2]
    ran = check(run_cli("train", str(auto_config), nproc=2))
    assert f"micro-batch 2 x accumulation 2 x world size 2; predicted peak {peaks[2] / 1e9:.2f} GB per rank (DDP)" in ran.stdout
    recorded = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]
    assert (recorded["micro_batch_size"], recorded["gradient_accumulation_steps"]) == (2, 2)
    check(run_cli("train", str(write_config(tmp_path / "explicit.yaml", explicit)), nproc=2))
    mine, theirs = final_weights(tmp_path / "auto"), final_weights(tmp_path / "out")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-5)


def test_unreachable_global_batch_is_one_line(tmp_path: Path):
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tmp_path, train={"micro_batch_size": "auto", "global_batch_size": 9, "memory_budget_gb": 1})
    )
    plan = run_cli("plan", str(config), "--gpus-per-node", "2")
    assert plan.returncode == 2 and plan.stderr == (
        "launcher: error: train.global_batch_size: 9 samples cannot be split over 2 ranks (no micro-batch reaches it); set it to a multiple of 2\n"
    )


def test_llama_3_8b_peak_counts_activations_and_the_fsdp2_window(tmp_path: Path):
    config = tiny_config(tmp_path, model={"hf_config": LLAMA_3_8B}, fsdp={})
    config["data"].update(seq_len=4096, pack=True)
    config["train"].update(micro_batch_size=1, gradient_accumulation_steps=8, mixed_precision="bf16")
    row = plan_json(write_config(tmp_path / "c.yaml", config), "--nodes", "2", "--gpus-per-node", "8")["memory"]["FSDP2"]
    n_params = 8_030_261_248
    # the window's unsharded fp32 gradients (32.1 GB), in place of the shards: gradients are None after each step,
    # and the window's last backward frees a unit's unsharded gradients as it makes their shards
    assert row["gradients"] == 4 * n_params and row["optimizer"] == 2 * row["parameters"]
    assert row["logits"] == 4096 * 128256 * (2 + 2 + 4 + 4)  # bf16 logits and their gradient, the fp32 copy, the log-softmax
    assert row["activations"] > 20e9  # 32 layers at 4096 tokens: far more than the logits alone
    assert row["peak"] >= row["parameters"] + row["gradients"] + row["optimizer"] + row["activations"] > 60e9
