"""Hugging Face models with every guarantee of the built-in GPT: tiny Llama- and GPT-2-style models made locally
(bf16 checkpoints with their own BPE tokenizers), trained with exact accumulation on 1 and 2 gloo ranks, under DDP
and DeepSpeed ZeRO-2/3, frozen by HF parameter names, with LoRA, and exported to folders that load back."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.config import DataConfig, load_config
from launcher.data import load_documents, prepare_splits, tokenize_into_blocks
from launcher.tokenizer import HFTokenizer, load_tokenizer

from conftest import check, disk_snapshot, final_weights, hf_config, library_lines, metrics, run_cli, tiny_config, write_config, write_documents

transformers = pytest.importorskip("transformers", reason="Hugging Face models need the hf extra: scripts/setup hf,dev")
FROZEN = ["model.embed_tokens.*", "model.layers.0.self_attn.*"]  # Hugging Face names, as `launcher inspect` lists them


def pretrained_fp32(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's (bf16) tensors as the fp32 master weights they become: an exact upcast."""
    return {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def assert_same_training(rows, reference_rows, weights, reference_weights, what: str):
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows], what
    for row, ref in zip(rows, reference_rows):
        assert abs(row["loss"] - ref["loss"]) < 1e-5, (what, row, ref)
        assert abs(row["grad_norm"] - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], (what, row, ref)
    assert weights.keys() == reference_weights.keys(), what
    for key, tensor in reference_weights.items():
        torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")


def test_token_ids_are_the_tokenizers_own(tiny_hf, tmp_path):
    """Each document is tokenizer(text) with the tokenizer's special tokens (Llama's BOS; GPT-2 adds none), then
    EOS; padding uses the pad id (GPT-2 has none: EOS). A changed tokenizer never reuses another's cache."""
    texts = ["def f(x):\n    return x", "The quick brown fox.", "A longer document " * 6]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = load_documents(DataConfig(path=tmp_path / "docs.jsonl"))  # from a file: tokenizing is cached
    for arch, model_dir in tiny_hf.items():
        hf = transformers.AutoTokenizer.from_pretrained(model_dir)
        tok = HFTokenizer(hf, str(model_dir))
        expected = [hf(t)["input_ids"] + [hf.eos_token_id] for t in texts]
        assert (expected[0][0] == hf.bos_token_id) == (arch == "llama")
        pad = hf.pad_token_id if arch == "llama" else hf.eos_token_id
        blocks = tokenize_into_blocks(docs, seq_len=64, pack=False, tokenizer=tok)
        for row, length, ids in zip(blocks["input_ids"], blocks["length"], expected):
            assert row[:length].tolist() == ids and set(row[length:].tolist()) <= {pad}, arch
        packed = tokenize_into_blocks(docs, seq_len=8, pack=True, tokenizer=tok)
        stream = [t for row, n in zip(packed["input_ids"], packed["length"]) for t in row[:n].tolist()]
        assert stream == [t for ids in expected for t in ids], arch
    llama, gpt2 = (HFTokenizer(transformers.AutoTokenizer.from_pretrained(tiny_hf[a]), a) for a in ("llama", "gpt2"))
    first = tokenize_into_blocks(docs, 64, False, llama)
    assert first.cache_files and tokenize_into_blocks(docs, 64, False, llama).cache_files == first.cache_files  # cache hit
    other = tokenize_into_blocks(docs, 64, False, gpt2)
    assert other.cache_files and other.cache_files != first.cache_files
    assert other["input_ids"][0][:3].tolist() != first["input_ids"][0][:3].tolist()


@pytest.fixture(scope="module")
def llama_runs(tiny_hf, tmp_path_factory):
    """One tiny Llama job, with the same global batch of 4 split five ways: padded variable-length documents whose
    count leaves a partial last window, clipping active, the embedding and layer 0's attention frozen by name."""
    tmp = tmp_path_factory.mktemp("llama-runs")
    config = hf_config(
        tmp,
        tiny_hf["llama"],
        freeze=FROZEN,
        data={"path": str(write_documents(tmp / "docs.jsonl", 27)), "seq_len": 32, "pack": False},
        train={"max_grad_norm": 0.5, "warmup_steps": 2, "learning_rate": 3e-3},
    )
    path = write_config(tmp / "c.yaml", config)
    cfg = load_config(path)
    n_train = len(prepare_splits(cfg.data, cfg.seed, load_tokenizer(cfg))[0])
    assert n_train % 4 != 0, "the data must leave a partial last window"
    max_steps = -(-n_train // 4) + 1  # through the partial window into the next epoch
    splits = {  # name: (processes, micro-batch, accumulation, launcher, extra overrides)
        "2 ranks x 2 (accelerate launch)": (2, 1, 2, "accelerate", []),
        "1 rank x 4": (1, 1, 4, None, []),
        "1 rank x 1 big batch": (1, 4, 1, None, []),
        "ZeRO-2, 2 ranks x 2": (2, 1, 2, None, ["deepspeed=configs/deepspeed/zero2.json"]),
        "ZeRO-3, 2 ranks x 2": (2, 1, 2, None, ["deepspeed=configs/deepspeed/zero3.json"]),
    }
    runs = {}
    for name, (nproc, micro, accumulation, launcher, extra) in splits.items():
        if extra:
            pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
        out = tmp / re.sub(r"\W+", "_", name)
        proc = check(
            run_cli(
                "train",
                str(path),
                f"output_dir={out}",
                f"train.max_steps={max_steps}",
                f"train.micro_batch_size={micro}",
                f"train.gradient_accumulation_steps={accumulation}",
                *extra,
                nproc=nproc,
                launcher=launcher,
            )
        )
        runs[name] = (out, proc)
    return runs


def test_hf_model_trains_the_same_however_the_global_batch_is_split(llama_runs, tiny_hf):
    reference_out, _ = llama_runs["1 rank x 1 big batch"]
    reference_rows = [r for r in metrics(reference_out) if "loss" in r]
    assert max(r["grad_norm"] for r in reference_rows) > 0.5, "clipping must be active in this test"
    pretrained = pretrained_fp32(tiny_hf["llama"])
    for name, (out, proc) in llama_runs.items():
        assert "weights fp32" in proc.stdout and "BOS 1 added, pad 1024" in proc.stdout, name  # the run header
        rows = [r for r in metrics(out) if "loss" in r]
        assert_same_training(rows, reference_rows, final_weights(out), final_weights(reference_out), name)
        weights = final_weights(out)
        for key, tensor in pretrained.items():  # frozen: bitwise the checkpoint's values; trained: moved
            frozen = key.startswith(("model.embed_tokens.", "model.layers.0.self_attn."))
            assert torch.equal(weights[key], tensor) == frozen, f"{name}: {key} {'changed' if frozen else 'did not change'}"


def test_the_console_holds_the_launchers_lines_only(llama_runs):
    """1- and 2-process runs (DDP, ZeRO-2/3): the libraries' warnings (torch's FutureWarnings under ZeRO, DeepSpeed's
    "Setting accelerator to CPU") are in each rank's logs/rank-N.log, not on the console."""
    for name, (out, proc) in llama_runs.items():
        assert library_lines(proc) == [], name
        if "ZeRO" in name:  # kept, not dropped: DeepSpeed's collectives raise torch's FutureWarnings, in each rank's log
            logs = [(out / "logs" / f"rank-{rank}.log").read_text() for rank in range(2)]
            assert all(re.search(r"site-packages/torch/\S+: FutureWarning: ", log) for log in logs), name


def test_zero3_export_is_a_complete_model_folder(llama_runs, tiny_hf):
    out, _ = llama_runs["ZeRO-3, 2 ranks x 2"]
    final = out / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_runs["1 rank x 4"][0] / "final")
    assert model.dtype == torch.float32 and set(final_weights(out)) == set(pretrained_fp32(tiny_hf["llama"]))
    ids = torch.randint(0, 1025, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    assert tokenizer("def f")["input_ids"] == transformers.AutoTokenizer.from_pretrained(tiny_hf["llama"])("def f")["input_ids"]
    assert (final / "generation_config.json").is_file() and json.loads((final / "config.json").read_text())["use_cache"] is True


@pytest.fixture(scope="module")
def lora_runs(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-runs")
    config = hf_config(
        tmp,
        tiny_hf["llama"],
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        freeze=["model.layers.0.*"],  # after LoRA: freezes layer 0's adapters too
        export={"merge_lora": True},
        train={"learning_rate": 1e-2, "max_steps": 5},
    )
    path = write_config(tmp / "c.yaml", config)
    runs = {}
    for name, (nproc, micro, accumulation, extra) in {
        "DDP, 2 ranks x 2": (2, 1, 2, []),
        "1 rank x 4": (1, 1, 4, []),
        "ZeRO-3, 2 ranks x 2": (2, 1, 2, ["deepspeed=configs/deepspeed/zero3.json"]),
    }.items():
        if extra:
            pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: scripts/setup deepspeed,dev")
        out = tmp / re.sub(r"\W+", "_", name)
        runs[name] = (
            check(
                run_cli(
                    "train",
                    str(path),
                    f"output_dir={out}",
                    f"train.micro_batch_size={micro}",
                    f"train.gradient_accumulation_steps={accumulation}",
                    *extra,
                    nproc=nproc,
                )
            ),
            out,
        )
    return runs


def test_lora_adapters_train_exactly_and_load_with_peft(lora_runs, tiny_hf):
    peft = pytest.importorskip("peft", reason="LoRA needs the hf extra: scripts/setup hf,dev")
    proc, reference_out = lora_runs["1 rank x 4"]
    table = proc.stdout[proc.stdout.index("module ") : proc.stdout.index("total")]
    # per layer: q_proj 4x64 + 64x4, v_proj 4x64 + 32x4 (grouped-query: 2 key/value heads); layer 0's frozen by the pattern
    assert re.search(r"model\.layers \(LoRA adapters\)\s+896\s+896", table), table
    reference = load_file(str(reference_out / "final" / "adapter_model.safetensors"))
    reference_rows = [r for r in metrics(reference_out) if "loss" in r]
    for name, (_, out) in lora_runs.items():
        adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
        assert_same_training([r for r in metrics(out) if "loss" in r], reference_rows, adapter, reference, name)
        layer0 = [k for k in adapter if ".layers.0." in k]
        assert layer0 and all(not adapter[k].any() for k in layer0 if "lora_B" in k), "frozen adapters keep B = 0"

        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["llama"], dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, out / "final")
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
        ids = torch.randint(0, 1025, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=0, atol=1e-5)
            plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["llama"], dtype=torch.float32)
            assert (plain(ids).logits - with_adapter(ids).logits).abs().max() > 1e-3, "the adapter must change the model"
        adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(Path(tiny_hf["llama"]).resolve())


def test_export_loads_back_with_the_in_memory_models_logits(tiny_hf, tmp_path, fresh_accelerate):
    """GPT-2 style (tied embeddings): final/ loads with from_pretrained and gives the trained model's logits; export
    in bf16 and sharded on request."""
    from launcher.build import build_run
    from launcher.loop import train
    from launcher.models.hf import export_hf

    config = write_config(tmp_path / "c.yaml", hf_config(tmp_path, tiny_hf["gpt2"], train={"max_steps": 3}))
    run = build_run(load_config(config))
    train(run)
    model = run.accelerator.unwrap_model(run.model).eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    ids = torch.randint(0, 1025, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
        unique = len({t.data_ptr() for t in model.state_dict().values()})  # lm_head.weight is the embedding
        assert len(final_weights(tmp_path / "out")) == unique == 28 and "lm_head.weight" not in final_weights(tmp_path / "out")

        # a gathered state dict (DeepSpeed's fp32 master copies, FSDP2's) holds a copy per name: stored once all the same
        export_hf(model, {k: t.clone() for k, t in model.state_dict().items()}, run.tokenizer, run.cfg, tmp_path / "copies")
        assert len(load_file(str(tmp_path / "copies" / "model.safetensors"))) == unique
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "copies")(ids).logits, expected)

        run.cfg.export.dtype, run.cfg.export.max_shard_size = "bf16", "150KB"
        export_hf(model, model.state_dict(), run.tokenizer, run.cfg, tmp_path / "bf16")
        index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())  # sharded
        assert len(index["weight_map"]) == unique  # the cast to bf16 makes a copy per name: still stored once
        small = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
        assert small.dtype == torch.bfloat16
        torch.testing.assert_close(small(ids).logits.float(), expected, rtol=0.05, atol=0.05)


def test_gradient_checkpointing_gives_the_same_weights(tiny_hf, tmp_path, fresh_accelerate):
    """Recomputing activations in the backward changes memory, not the result: a tiny Llama and the built-in GPT
    (with dropout, whose masks the recomputation must reproduce)."""
    from launcher.build import build_run
    from launcher.loop import train

    from conftest import reset_accelerate

    cases = {
        "llama": hf_config(tmp_path, tiny_hf["llama"], train={"max_steps": 3}),
        "built-in GPT": tiny_config(tmp_path, model={"dropout": 0.1}, train={"max_steps": 3}),
    }
    for name, config in cases.items():
        weights = {}
        for checkpointing in (False, True):
            out = tmp_path / f"{name}-{checkpointing}"
            path = write_config(tmp_path / "c.yaml", {**config, "output_dir": str(out)})
            reset_accelerate()
            run = build_run(load_config(path, [f"model.gradient_checkpointing={str(checkpointing).lower()}"]))
            model = run.accelerator.unwrap_model(run.model)
            on = next(
                getattr(model, a) for a in ("is_activation_checkpointing", "is_gradient_checkpointing", "gradient_checkpointing") if hasattr(model, a)
            )
            assert on == checkpointing, name
            train(run)
            weights[checkpointing] = final_weights(out)
        for key, tensor in weights[False].items():
            torch.testing.assert_close(weights[True][key], tensor, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_stopped_and_resumed_hf_run_is_bitwise_identical(tiny_hf, tmp_path):
    from test_resume import run_with_signal

    config = write_config(
        tmp_path / "c.yaml",
        hf_config(
            tmp_path,
            tiny_hf["llama"],
            freeze=FROZEN,
            checkpoint={"every_steps": 2},
            train={"max_steps": 6, "gradient_accumulation_steps": 2, "micro_batch_size": 2},
        ),
    )
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'straight'}", nproc=2))
    stopped = run_with_signal(config, 5, 2, f"output_dir={tmp_path / 'stopped'}")  # mid-window of step 3
    assert stopped.returncode != 0 and json.loads((tmp_path / "stopped" / "preempted.json").read_text())["step"] == 3
    check(run_cli("train", str(config), f"output_dir={tmp_path / 'stopped'}", "resume=auto", nproc=2))
    reference = final_weights(tmp_path / "straight")
    for key, tensor in final_weights(tmp_path / "stopped").items():
        assert torch.equal(tensor, reference[key]), key


def test_debug_mode_and_nonfinite_report_name_hf_parameters(tiny_hf, tmp_path):
    from test_diagnostics import run_tests_cli

    config = write_config(tmp_path / "c.yaml", hf_config(tmp_path, tiny_hf["llama"], freeze=["model.embed_tokens.*", "model.layers.0.*"]))
    stdout = check(run_cli("train", str(config), "--debug", "--debug-steps", "2")).stdout
    summary = stdout[stdout.index("debug summary") :]
    assert "parameters: 11 trainable (11 changed), 10 frozen (10 unchanged)" in summary
    assert "gradient norm by layer at step 2: model.layers.1 " in summary and "WARNING" not in summary

    planted = "model.layers.1.mlp.up_proj.weight"
    nan = hf_config(tmp_path, tiny_hf["llama"], launch={"nproc_per_node": 2}, output_dir=str(tmp_path / "nan"))
    nan["model"] = {
        "factory": "factories:nan_gradient_hf",
        "factory_kwargs": {"path": str(tiny_hf["llama"]), "param": planted, "rank": 1, "step": 2, "accumulation": 2},
    }
    nan["tokenizer"] = str(tiny_hf["llama"])
    nan_config = write_config(tmp_path / "nan.yaml", nan)
    assert planted in run_tests_cli("inspect", str(nan_config)).stdout  # a factory calling from_pretrained: built on CPU
    proc = run_tests_cli("train", str(nan_config))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr
    assert "rank 1: loss sum" in proc.stderr and f"non-finite in 1 of 21 parameters: {planted} (norm nan)" in proc.stderr


def test_pretraining_an_hf_architecture_from_an_inline_config(tmp_path):
    """model.hf_config as a mapping: a fresh Llama whose vocabulary is the byte-level tokenizer's (no files at all)."""
    config = tiny_config(tmp_path, train={"max_steps": 2})
    config["model"] = {
        "hf_config": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
        }
    }
    proc = check(run_cli("train", str(write_config(tmp_path / "c.yaml", config))))
    assert "a Hugging Face config (from scratch) (LlamaForCausalLM)" in proc.stdout and "byte-level (257 ids)" in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert model.config.vocab_size == 257 and model.get_input_embeddings().num_embeddings == 257


def bigger_tokenizer(model_dir: Path, folder: Path, extra: int = 7) -> Path:
    """The model's tokenizer with `extra` added tokens: more ids than the model's embedding has rows."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra)])
    tokenizer.save_pretrained(folder)
    return folder


def test_inspect_and_plan_read_no_weights(tiny_hf, tmp_path):
    """A folder with the config and tokenizer but no weight files: inspect and plan work (meta device); training
    says, in one line, that the weights are missing. model.resize_embeddings grows the rows to a larger tokenizer."""
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_hf["llama"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = write_config(tmp_path / "c.yaml", hf_config(tmp_path, folder, freeze=FROZEN))
    listing = check(run_cli("inspect", str(config))).stdout
    assert re.search(r"model\.embed_tokens\.weight\s+1025x64\s+65,600\s+frozen", listing), listing
    assert re.search(r"lm_head\.weight\s+1025x64\s+65,600\s+yes", listing)
    assert "world size 1" in check(run_cli("plan", str(config))).stdout
    bigger = bigger_tokenizer(tiny_hf["llama"], tmp_path / "bigger")
    resized = check(run_cli("inspect", str(config), f"tokenizer={bigger}", "model.resize_embeddings=true")).stdout
    assert re.search(r"model\.embed_tokens\.weight\s+1032x64", resized) and re.search(r"lm_head\.weight\s+1032x64", resized)
    proc = run_cli("train", str(config))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model: cannot build" in proc.stderr, proc.stderr


def test_factory_module_beside_the_config_gets_the_tokenizers_vocabulary(tiny_hf, tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from launcher.models import GPT\n\n"
        "def small(vocab_size, seq_len, width):\n"
        "    return GPT(vocab_size, seq_len, n_layer=1, n_head=2, d_model=width)\n"
    )
    config = tiny_config(tmp_path, train={"max_steps": 1})
    config["model"] = {"factory": "my_models:small", "factory_kwargs": {"width": 16}}
    config["tokenizer"] = str(tiny_hf["gpt2"])
    check(run_cli("train", str(write_config(tmp_path / "c.yaml", config))))  # no PYTHONPATH: found beside the config
    assert final_weights(tmp_path / "out")["tok_embed.weight"].shape == (1025, 16)


def test_fine_tuning_guide_example(tmp_path):
    """The fine-tuning guide's commands (docs/guides/fine-tune-hf.md), shortened, and its loading snippet as written."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "fine-tune-hf.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    check(run_cli("make-tiny-model", str(tmp_path / "tiny-llama")))
    check(
        run_cli(
            "train",
            "configs/finetune-hf.yaml",
            f"model.pretrained={tmp_path / 'tiny-llama'}",
            f"output_dir={tmp_path / 'ft'}",
            "train.max_steps=4",
            "launch.nproc_per_node=1",
            "eval.every_steps=null",
            "eval.max_samples=8",
        )
    )
    assert "outputs/finetune-hf/final" in snippet
    namespace = {}
    exec(snippet.replace("outputs/finetune-hf/final", str(tmp_path / "ft" / "final")), namespace)
    assert namespace["text"].startswith("def ") and len(namespace["text"]) > len("def ")


FACTORY_MODULES = {  # file name -> source; each a model.factory that cannot train
    "raises_on_import.py": "x = 1 / 0\n",
    "other_args.py": "def make(width):\n    raise AssertionError('not reached')\n",
    "not_a_module.py": "def make(vocab_size, seq_len):\n    return 3\n",
    "returns_tuple.py": (
        "import torch\n\nclass M(torch.nn.Module):\n    def __init__(self, v):\n        super().__init__()\n"
        "        self.e = torch.nn.Embedding(v, v)\n    def forward(self, input_ids):\n"
        "        return self.e(input_ids), None\n\ndef make(vocab_size, seq_len):\n    return M(vocab_size)\n"
    ),
    "narrow_logits.py": (
        "import torch\n\ndef make(vocab_size, seq_len):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, 16), torch.nn.Linear(16, 10))\n"
    ),
    "needs_a_mask.py": (
        "import torch\n\nclass M(torch.nn.Module):\n    def __init__(self, v):\n        super().__init__()\n"
        "        self.e = torch.nn.Embedding(v, v)\n    def forward(self, input_ids, attention_mask):\n"
        "        return self.e(input_ids)\n\ndef make(vocab_size, seq_len):\n    return M(vocab_size)\n"
    ),
}
BAD_ROWS = {  # file name -> JSON lines; row 3 is bad
    "null_text.jsonl": ['{"text": "a"}', '{"text": "b"}', '{"text": null}', '{"text": "d"}'],
    "number_text.jsonl": ['{"text": "a"}', '{"text": "b"}', '{"text": 5}', '{"text": "d"}'],
    "missing_text.jsonl": ['{"text": "a"}', '{"text": "b"}', '{"title": "c"}', '{"text": "d"}'],
    "broken_line.jsonl": ['{"text": "a"}', '{"text": "b"}', '{"text": "c"', '{"text": "d"}'],
}
LLAMA, GPT2 = "{llama}", "{gpt2}"  # filled with the tiny models' folders
BAD_MODEL_INPUT = {  # name: (overrides, expected text in the one line)
    "pretrained folder missing": (["model.pretrained=/no/such/model"], "model.pretrained: folder '/no/such/model' not found"),
    "not a Hugging Face folder": (["model.pretrained={tmp}/plain"], "is not a Hugging Face model folder (no config.json)"),
    "tokenizer folder missing": ([f"model.pretrained={LLAMA}", "tokenizer=/no/such/tokenizer"], "tokenizer: folder '/no/such/tokenizer' not found"),
    "tokenizer larger than the embeddings": (
        [f"model.pretrained={LLAMA}", "tokenizer={tmp}/bigger"],
        "has 1032 ids but model.pretrained's embedding has 1025 rows; use the model's own tokenizer, or set model.resize_embeddings: true",
    ),
    "pretrained with built-in keys": (
        [f"model.pretrained={LLAMA}", "model.n_layer=2"],
        "model.n_layer: only for the built-in GPT, but model.pretrained chooses another model; remove them",
    ),
    "two model sources": ([f"model.pretrained={LLAMA}", "model.factory=a:b"], "model.pretrained and model.factory both choose the model"),
    "lora target matches nothing": (
        [f"model.pretrained={LLAMA}", "lora={target_modules: [qv_proj]}"],
        "lora.target_modules: 'qv_proj' match no module of the model; linear modules: down_proj, gate_proj",
    ),
    "lora on the built-in GPT": (["lora={r: 4}"], "lora: needs a Hugging Face model"),
    "merge_lora without lora": ([f"model.pretrained={LLAMA}", "export.merge_lora=true"], "export.merge_lora: there is no lora section"),
    "pure bf16 under DeepSpeed": (
        [f"model.pretrained={LLAMA}", "model.dtype=bf16", "deepspeed=configs/deepspeed/zero2.json"],
        "model.dtype: bf16 is pure 16-bit training",
    ),
    "sequence longer than the context": (
        [f"model.pretrained={GPT2}", "data.seq_len=300"],
        "data.seq_len: 300 is longer than the model's context (model.pretrained: max_position_embeddings 256)",
    ),
    "inline config without model_type": (["model.hf_config={hidden_size: 8}"], "model.hf_config: an inline mapping needs model_type"),
    "factory module missing": (["model.factory=no_such_module:make"], "model.factory: no module 'no_such_module' (looked in"),
    "factory module raises on import": (
        ["model.factory=raises_on_import:make"],
        "model.factory: importing 'raises_on_import' failed: ZeroDivisionError: division by zero (raises_on_import.py:1)",
    ),
    "factory takes other arguments": (["model.factory=other_args:make"], "it is called as make(vocab_size=..., seq_len=..., **model.factory_kwargs)"),
    "factory returns no module": (["model.factory=not_a_module:make"], "returned int, not a torch.nn.Module"),
    "factory model returns a tuple": (["model.factory=returns_tuple:make"], "the model returned tuple; return logits [batch, seq, vocab]"),
    "factory logits too narrow": (["model.factory=narrow_logits:make"], "logits of shape [1, 8, 10] for input_ids [1, 8]; expected [1, 8, 257]"),
    "factory forward needs more": (["model.factory=needs_a_mask:make"], "the model's forward failed on a batch of input_ids [1, 8]: TypeError"),
    "null text": (["data.path={tmp}/null_text.jsonl"], "row 3 of '{tmp}/null_text.jsonl' has no 'text' (null or missing)"),
    "number text": (["data.path={tmp}/number_text.jsonl"], "'text' is int 5, not text"),
    "missing text": (["data.path={tmp}/missing_text.jsonl"], "row 3 of '{tmp}/missing_text.jsonl' has no 'text' (null or missing)"),
    "broken JSON line": (["data.path={tmp}/broken_line.jsonl"], "line 3 is not valid JSON"),
}


# with 2 processes too: the cases the pre-flight finds only by building or running the model, or by reading rows
CASES = [(name, 1) for name in BAD_MODEL_INPUT] + [(name, 2) for name in BAD_MODEL_INPUT if name.startswith(("factory", "null", "tokenizer larger"))]


@pytest.mark.parametrize("name, processes", CASES, ids=[f"{n}, {p} process(es)" for n, p in CASES])
def test_bad_model_and_data_input_is_one_line_and_changes_nothing(tiny_hf, tmp_path: Path, name: str, processes: int):
    """One line naming the key or file and the fix, exit 2, nothing on disk changed; with 2 processes it is found
    before they start."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.bin").write_bytes(b"\0")
    bigger_tokenizer(tiny_hf["llama"], tmp_path / "bigger")
    for file, source in FACTORY_MODULES.items():
        (tmp_path / file).write_text(source)
    for file, rows in BAD_ROWS.items():
        (tmp_path / file).write_text("\n".join(rows) + "\n")
    config = tiny_config(tmp_path, launch={"nproc_per_node": processes})
    del config["model"]  # the built-in GPT's keys would be refused beside model.pretrained
    config = write_config(tmp_path / "c.yaml", config)
    places = {"{tmp}": tmp_path, LLAMA: tiny_hf["llama"], GPT2: tiny_hf["gpt2"]}

    def fill(text: str) -> str:
        for place, path in places.items():
            text = text.replace(place, str(path))
        return text

    overrides, expected = BAD_MODEL_INPUT[name]
    before = disk_snapshot(tmp_path, folders=True)
    proc = run_cli("train", str(config), *map(fill, overrides))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: ") and fill(expected) in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert disk_snapshot(tmp_path, folders=True) == before
