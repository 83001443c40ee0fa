"""Every config in configs/examples/ runs `launcher plan` as its comment says, with the real model's shapes on the meta
device (no weights): it loads, its batch arithmetic is the one its comment states, and the model is the published one
(its exact parameter count).

And the plan's predicted peak per rank (parameters, gradients, optimizer state, activations, buffers) fits the GPU its
comment names (`launcher plan --gpu`).
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from launcher.cli import main as launcher_main
from launcher.config import load_config

from conftest import REPO, write_documents

EXAMPLES = sorted((REPO / "configs" / "examples").glob("*.yaml"))

LLAMA_3_1_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# the shapes of each model's published config.json (what `huggingface-cli download` puts beside the weights)
PUBLISHED = {
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA_3_1_ROPE,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    "Llama-3.1-70B": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA_3_1_ROPE,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    "Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    "Qwen2.5-14B": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
}
# parameters of the base model, as their model cards count them (GPT-2: its tied head counted once)
BASE_PARAMETERS = {
    "llama3.1-8b-fsdp2-8gpu": 8_030_261_248,
    "llama3.1-8b-lora-1gpu": 8_030_261_248,
    "llama3.1-70b-lora-2node": 70_553_706_496,
    "qwen2.5-7b-chat-sft": 7_615_616_512,
    "qwen2.5-14b-zero3-offload": 14_770_033_664,
    "gpt2-124m-pretrain-2node": 124_439_808,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_hf, chat_tokenizers) -> Path:
    """A folder laid out as the examples' comments ask (models/, data/), with configs/ linked from the checkout. A model
    folder holds its published config.json and a tiny tokenizer: `plan` reads no weights, and the tokenizer only
    tokenizes the small data here (a tokenizer with fewer ids than the model's rows is allowed)."""
    root = tmp_path_factory.mktemp("examples")
    (root / "configs").symlink_to(REPO / "configs")
    tokenizer_of = {"Qwen2.5-7B-Instruct": chat_tokenizers["chatml"]}  # a chat model: its chat template is needed
    for name, config in PUBLISHED.items():
        folder = root / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        source = tokenizer_of.get(name, tiny_hf["llama"])
        for file in source.iterdir():
            if file.name not in ("config.json", "model.safetensors", "generation_config.json"):  # the tokenizer's files
                (folder / file.name).write_bytes(file.read_bytes())
    (root / "models" / "gpt2").mkdir()
    for file in tiny_hf["gpt2"].glob("tokenizer*"):
        (root / "models" / "gpt2" / file.name).write_bytes(file.read_bytes())
    (root / "data" / "pretrain").mkdir(parents=True)
    write_documents(root / "data" / "train.jsonl", 400, max_chars=400)
    write_documents(root / "data" / "pretrain" / "part-000.jsonl", 300, max_chars=400)
    write_documents(root / "data" / "pretrain" / "part-001.jsonl", 300, seed=1, max_chars=400)
    conversations = [
        {
            "conversations": [
                {"role": "user", "content": f"question {i}: " + "why " * (i % 7)},
                {"role": "assistant", "content": "because " * (1 + i % 5)},
            ]
        }
        for i in range(200)
    ]
    (root / "data" / "sharegpt.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return root


def header(path: Path) -> dict[str, str]:
    """The example's `# Key: value` comment lines at its top."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return dict(re.match(r"# (\w[\w ]*?):\s+(.*)", line).groups() for line in lines if re.match(r"# (Hardware|Run|Plan|Batch):", line))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans_as_its_comment_says(path: Path, workspace: Path, monkeypatch, capsys):
    facts = header(path)
    assert set(facts) == {"Hardware", "Run", "Plan", "Batch"}, f"{path.name}: its first comment lines give the hardware and the commands"
    relative = str(path.relative_to(REPO))
    assert relative in facts["Run"] and facts["Plan"].startswith(f"launcher plan {relative}")
    monkeypatch.chdir(workspace)  # the relative paths of the example (models/, data/) resolve here
    load_config(relative)

    assert launcher_main(shlex.split(facts["Plan"])[1:]) == 0
    plan = capsys.readouterr().out
    batch = re.fullmatch(r"(global batch (\d+) = micro-batch (\d+) x accumulation (\d+) x world size (\d+))(\s.*)?", facts["Batch"])
    assert batch, facts["Batch"]
    assert batch.group(1) in plan.splitlines()
    global_batch, micro, accumulation, world = (int(g) for g in batch.groups()[1:5])
    assert global_batch == micro * accumulation * world
    nodes = re.search(r"--nodes[ =](\d+)", facts["Plan"])
    gpus = re.search(r"--gpus-per-node[ =](\d+)", facts["Plan"])
    assert world == (int(nodes.group(1)) if nodes else 1) * int(gpus.group(1))

    totals = re.search(r"^total +([\d,]+) +([\d,]+)$", plan, re.M)
    trainable, frozen = (int(n.replace(",", "")) for n in totals.groups())
    lora = load_config(relative).lora is not None
    assert (frozen if lora else trainable) == BASE_PARAMETERS[path.stem]  # LoRA: the base frozen, the adapters trained
    assert (trainable > 0) if lora else (frozen == 0)


# the GPU each example's Hardware comment names (the smallest it allows), for `launcher plan --gpu`
GPU_OF = {
    "llama3.1-8b-fsdp2-8gpu": "H100",
    "llama3.1-8b-lora-1gpu": "H100",
    "llama3.1-70b-lora-2node": "H100",
    "qwen2.5-7b-chat-sft": "H100",
    "qwen2.5-14b-zero3-offload": "L4",
    "gpt2-124m-pretrain-2node": "A100-40",
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_fits_the_gpu_its_comment_names(path: Path, workspace: Path, monkeypatch, capsys):
    """The plan's predicted peak per rank (parameters, gradients, optimizer state, activations, buffers) fits the GPU
    the example is written for."""
    gpu = GPU_OF[path.stem]
    hardware = header(path)["Hardware"]
    assert gpu.split("-")[0] in hardware and (gpu != "A100-40" or "40 GB" in hardware), f"{path.name}: written for {hardware}"
    monkeypatch.chdir(workspace)
    assert launcher_main([*shlex.split(header(path)["Plan"])[1:], "--gpu", gpu, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    peak = plan["memory"][plan["backend"]]["peak"]
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in plan["memory"][plan["backend"]].items() if k != "peak")
    assert plan["device"]["fits"], (
        f"{path.name}: predicted peak {peak / 1e9:.1f} GB per rank ({parts}) does not fit {gpu}: {plan['device'].get('suggestions')}"
    )
