"""Model FLOPs per token against FLOPs counted while a real forward and backward run, the peak table, and mfu
in the metrics of a run on CPU (train.peak_tflops)."""

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launcher.build import build_run
from launcher.config import load_config
from launcher.errors import UsageError
from launcher.flops import PEAK_TFLOPS, flops_per_token, known_gpu, make_mfu, matmul_dtype
from launcher.freezing import apply_freeze
from launcher.loop import train
from launcher.models import GPT

from conftest import metrics, tiny_config, write_config


def counted_flops_per_token(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Matmul FLOPs of one forward and backward as PyTorch's FlopCounterMode counts them. The math attention
    kernel is a pair of batched matmuls (a fused kernel on CPU is not counted); like the formula, it computes
    the full score matrix and masks it afterwards."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        output = model(input_ids)
        (output if isinstance(output, torch.Tensor) else output.logits).float().sum().backward()
    return counter.get_total_flops() / input_ids.numel()


def tiny_llama(tie: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# GPT(vocab 256, seq 32, 2 layers, d 32): matrices 12 d^2 per layer and the 256 x d head, N = 32,768;
# attention 12 * L * d * seq = 24,576 per token. Frozen parameters drop their weight gradient (2 per parameter),
# and those before the first trainable one also their input gradient; so does the attention of such a layer (8 of 12).
@pytest.mark.parametrize(
    "freeze, want",
    [
        ([], 6 * 32_768 + 24_576),
        (["pos_embed.*"], 6 * 32_768 + 24_576),  # lookup tables hold no matmul FLOPs
        (["blocks.1.*"], 6 * 32_768 + 24_576 - 2 * 12_288),
        (["tok_embed.*", "pos_embed.*", "blocks.0.*"], 6 * 32_768 + 24_576 - 4 * 12_288 - 8 * 32 * 32),
        (["tok_embed.*", "pos_embed.*", "blocks.*", "final_norm.*"], 2 * 24_576 + 4 * 8_192 + 4 * 32 * 32 * 2),  # the head alone
    ],
)
def test_builtin_gpt_flops_match_counted_flops(freeze, want):
    torch.manual_seed(0)
    model = GPT(vocab_size=256, seq_len=32, n_layer=2, n_head=2, d_model=32)
    apply_freeze(model, freeze)
    assert flops_per_token(model, seq_len=32) == want
    assert counted_flops_per_token(model, torch.randint(0, 256, (3, 32))) == want


@pytest.mark.parametrize("tie", [False, True])
def test_hugging_face_model_flops_match_counted_flops(tie: bool):
    """A tiny Llama from its config (grouped-query attention, norms listed after the layer's matmuls but applied
    first), with the head untied and tied to the input embedding (then the embedding counts, as the head)."""
    model = tiny_llama(tie)
    input_ids = torch.randint(0, 128, (2, 16))
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64  # q, o; k, v (2 of 4 heads); gate, up, down
    want = 6 * (2 * per_layer + 128 * 32) + 12 * 2 * 32 * 16
    assert flops_per_token(model, seq_len=16) == want
    assert counted_flops_per_token(model, input_ids) == want

    model.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():  # the embedding and the first layer frozen
        param.requires_grad_(not name.startswith(("model.embed_tokens.", "model.layers.0.")))
    head = 128 * 32 * (4 if tie else 6)  # a tied head is the frozen embedding: no weight gradient
    want_frozen = 2 * per_layer + 4 * 32 * 16 + 6 * per_layer + 12 * 32 * 16 + head
    assert flops_per_token(model, seq_len=16) == want_frozen
    assert counted_flops_per_token(model, input_ids) == want_frozen


def test_gpt2_small_preset_and_unknown_shapes():
    with torch.device("meta"):
        model = GPT(vocab_size=256, seq_len=1024, n_layer=12, n_head=12, d_model=768)
    n = 12 * 12 * 768**2 + 256 * 768
    assert flops_per_token(model, seq_len=1024) == 6 * n + 12 * 12 * 768 * 1024 == 624_033_792

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert flops_per_token(mlp, seq_len=8) is None
    mfu, line = make_mfu(mlp, 8, torch.device("cpu"), "no", 1.0, 1)
    assert mfu is None and line.startswith("mfu: not logged: the model's layer count")

    from transformers import AutoModelForCausalLM, MixtralConfig

    moe = AutoModelForCausalLM.from_config(
        MixtralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
        )
    )
    assert flops_per_token(moe, seq_len=8) is None  # all experts' parameters are not the active ones


def test_peak_table_and_dtype():
    names = {
        "NVIDIA H100 80GB HBM3": "H100 SXM",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H100 NVL": "H100 NVL",
        "NVIDIA H200": "H200",
        "NVIDIA H200 NVL": "H200 NVL",
        "NVIDIA GH200 480GB": "H200",
        "NVIDIA A100-SXM4-80GB": "A100",
        "NVIDIA A100 80GB PCIe": "A100",
        "NVIDIA A100-PCIE-40GB": "A100",
        "NVIDIA L40S": "L40S",
        "NVIDIA L4": "L4",
        "NVIDIA A10": "A10",
        "NVIDIA B200": "B200",
        "NVIDIA A10G": None,
        "NVIDIA GeForce RTX 4090": None,
        "Tesla V100-SXM2-16GB": None,
    }
    assert {name: known_gpu(name) for name in names} == names
    assert PEAK_TFLOPS["H100 SXM"]["bf16"] == 989.4 and PEAK_TFLOPS["A100"]["tf32"] == 156.0

    model = GPT(vocab_size=256, seq_len=8, n_layer=1, n_head=1, d_model=8)
    assert matmul_dtype(model, "bf16") == "bf16" and matmul_dtype(model, "fp16") == "fp16"
    assert matmul_dtype(model, "no") == "fp32"
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls allowed
    try:
        assert matmul_dtype(model, "no") == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert matmul_dtype(model.to(torch.bfloat16), "no") == "bf16"

    mfu, line = make_mfu(model, 8, torch.device("cpu"), "no", None, 1)
    assert mfu is None and line == "mfu: not logged: no peak FLOP/s known for cpu; set train.peak_tflops (the device's dense peak in TFLOP/s)"
    mfu, line = make_mfu(model, 8, torch.device("cpu"), "no", 2.5, 4)
    assert mfu.peak_flops == 4 * 2.5e12 and mfu.flops_per_token == flops_per_token(model, 8)
    assert mfu.of(1e6) == pytest.approx(1e6 * mfu.flops_per_token / 1e13, rel=1e-12)
    assert "2.5 TFLOP/s per device (train.peak_tflops) x 4 processes" in line


def test_mfu_and_no_memory_in_a_cpu_run(tmp_path: Path, fresh_accelerate, capsys):
    config = tiny_config(tmp_path, train={"max_steps": 4, "log_every": 2, "peak_tflops": 0.05})
    run = build_run(load_config(write_config(tmp_path / "c.yaml", config)), overwrite=True)
    train(run)
    rows = [r for r in metrics(run.cfg.output_dir) if "loss" in r]
    per_token = flops_per_token(run.accelerator.unwrap_model(run.model), 32)
    assert per_token == 6 * (2 * 12 * 32**2 + 257 * 32) + 12 * 2 * 32 * 32  # the byte tokenizer's 257 symbols
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / 0.05e12, rel=1e-12)
        assert not any(key.startswith("max_memory") for key in row)  # GPU memory only
    assert "mfu: 221.4 kFLOP per token (6N + attention at seq_len 32) over 0.05 TFLOP/s per device" in capsys.readouterr().out

    with pytest.raises(UsageError, match="train.peak_tflops"):
        load_config(write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, train={"peak_tflops": 0})))
