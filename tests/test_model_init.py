"""A model's initial weights are its architecture's own, whatever ran before in the process: `model.hf_config` equals
`AutoModelForCausalLM.from_config` with the run's seed (the pre-flight's meta-device build must leave torch's
initializers alone), and a pretrained folder missing a tensor is initialized as `from_pretrained` does, with a warning
naming it (and a tensor no parameter takes). Each case is one real 1-process `launcher train` in a fresh process
(where the pre-flight is the first to import transformers' modeling code), whose initial weights the same process
then saves."""

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PYTHON, REPO, check, cpu_env, library_lines, metrics, tiny_config, write_config

transformers = pytest.importorskip("transformers", reason="Hugging Face models need the hf extra: scripts/setup hf,dev")
SEED = 3
MISSING = "model.layers.1.mlp.up_proj.weight"
EXTRA = "model.layers.1.mlp.old_proj.weight"


def train_and_build(config: Path, weights: Path) -> subprocess.CompletedProcess:
    """tests/workers/initial_weights.py: the run, then the initial weights as its build path makes them."""
    cmd = [PYTHON, str(REPO / "tests" / "workers" / "initial_weights.py"), str(config), str(weights)]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tiny_hf, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, dict]]:
    """name: (the process, its output_dir, the initial weights): a Llama and a GPT-2 from their config.json
    (model.hf_config, with the folder's tokenizer), and the tiny Llama pretrained from a copy missing one tensor and
    holding one the model has no parameter for."""
    tmp = tmp_path_factory.mktemp("init")
    partial = tmp / "llama-missing-one"
    partial.mkdir()
    for file in tiny_hf["llama"].iterdir():
        (partial / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(tiny_hf["llama"] / "model.safetensors"))
    del tensors[MISSING]
    tensors[EXTRA] = torch.zeros(3)  # a tensor no parameter takes (a converted checkpoint's leftover)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    cases = {
        "llama from config": {"hf_config": str(tiny_hf["llama"])},
        "gpt2 from config": {"hf_config": str(tiny_hf["gpt2"])},
        "llama missing a tensor": {"pretrained": str(partial)},
    }
    results = {}
    for name, model in cases.items():
        folder = model.get("hf_config") or model["pretrained"]
        out = tmp / re.sub(r"\W+", "_", name)
        config = tiny_config(
            tmp, model=model, seed=SEED, output_dir=str(out), train={"max_steps": 2}, eval={"at_start": True}, checkpoint={"every_steps": 1}
        )
        config["tokenizer"] = folder
        proc = check(train_and_build(write_config(tmp / f"{out.name}.yaml", config), tmp / f"{out.name}.pt"))
        results[name] = (proc, out, torch.load(tmp / f"{out.name}.pt"))
    return results


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_config_initialization_is_the_architectures_own(runs, tiny_hf, arch):
    proc, out, weights = runs[f"{arch} from config"]
    torch.manual_seed(SEED)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny_hf[arch]), dtype=torch.float32
    ).state_dict()
    embedding = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
    assert abs(reference[embedding].std().item() - 0.02) < 1e-3  # the architecture's init (PyTorch's default: std 1)
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key
    eval_loss = next(r["eval_loss"] for r in metrics(out) if r["step"] == 0 and "eval_loss" in r)
    vocab = reference[embedding].shape[0]
    assert abs(eval_loss - math.log(vocab)) < 0.05, (eval_loss, math.log(vocab))  # uniform-ish logits: ln(1025) = 6.93


def test_a_tensor_missing_from_a_pretrained_folder_is_initialized_and_named(runs, tiny_hf):
    proc, out, weights = runs["llama missing a tensor"]
    partial = out.parent / "llama-missing-one"
    run_stderr = proc.stderr[: proc.stderr.index("initial_weights: the run ended")]
    warnings = [line for line in run_stderr.splitlines() if line.startswith("launcher: warning:")]
    assert warnings == [
        f"launcher: warning: model.pretrained: '{partial}' has no tensor for {MISSING}: initialized fresh, as from_pretrained does;"
        f" and 1 tensor(s) that no parameter takes, ignored: {EXTRA}; check that it is the model you meant"
    ], proc.stderr
    torch.manual_seed(SEED)
    reference = transformers.AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).state_dict()
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key
    folder = load_file(str(tiny_hf["llama"] / "model.safetensors"))
    assert all(torch.equal(weights[k], t.float()) for k, t in folder.items() if k != MISSING)  # the folder's own values
    assert abs(weights[MISSING].std().item() - 0.02) < 2e-3  # fresh, at the architecture's std (not memory left over)
    eval_loss = next(r["eval_loss"] for r in metrics(out) if r["step"] == 0 and "eval_loss" in r)
    assert abs(eval_loss - math.log(1025)) < 0.05, eval_loss


def test_the_console_holds_the_launchers_lines_only(runs):
    """GPT-2 (tied embeddings) checkpointed at both steps: accelerate's "Removed shared tensor" at each save, and every
    other library's warning, are in logs/rank-0.log (each text once), not on the run's console."""
    proc, out, _ = runs["gpt2 from config"]
    run = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr[: proc.stderr.index("initial_weights: the run")])
    assert "step 2/2" in run.stdout and library_lines(run) == [], run.stdout + run.stderr
    log = (out / "logs" / "rank-0.log").read_text()
    assert log.count("WARNING accelerate.utils.other: [RANK 0] Removed shared tensor {'lm_head.weight'} while saving.") == 1, log


def test_the_meta_build_changes_nothing_global_and_stays_cheap():
    """In a fresh process: inside initializers_skipped torch.nn.init is torch's own (a module imported there keeps the
    real functions), a real tensor is initialized as always, and the built-in GPT's meta build never imports
    torch._dynamo (what initializing meta tensors would cost: 2-3 s of every process's start)."""
    script = (
        "import sys, torch\n"
        "from launcher.models import initializers_skipped\n"
        "from launcher.models.gpt import GPT\n"
        "before = dict(vars(torch.nn.init))\n"
        "with torch.device('meta'), initializers_skipped():\n"
        "    inside = dict(vars(torch.nn.init))\n"
        "    GPT(300, 32, 2, 2, 32, 0.0, False)\n"
        "    real = torch.nn.init.ones_(torch.empty(3, device='cpu'))\n"
        "print(inside == before == dict(vars(torch.nn.init)), real.tolist(), 'torch._dynamo' in sys.modules)\n"
    )
    proc = check(subprocess.run([PYTHON, "-c", script], cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120))
    assert proc.stdout.split("\n")[0] == "True [1.0, 1.0, 1.0] False", proc.stdout
