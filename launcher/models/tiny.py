"""Tiny Hugging Face models made on the spot, for examples and tests where no model hub is reachable.

`launcher make-tiny-model OUT_DIR [--arch llama|gpt2]` writes a folder that `AutoModelForCausalLM` and
`AutoTokenizer` load like any downloaded checkpoint: a byte-level BPE tokenizer trained on the Python
documentation that ships with Python (`pydoc_data`), and a randomly initialized model of a few layers
saved in bf16, as most published checkpoints are.

The two architectures differ where tokenizers and models differ in the wild:
- `llama`: the tokenizer adds BOS (`<s>`, id 1) in front of every text, has EOS `</s>` (id 2) and a pad
  token added after training (the last id, as fine-tuning set-ups often add one); untied embeddings,
  grouped-query attention, rotary positions.
- `gpt2`: one special token `<|endoftext|>` (BOS and EOS, the last id, as in GPT-2), no BOS added, no pad
  token; tied embeddings, learned positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.models.hf import _transformers

ARCHES = ("llama", "gpt2")


def corpus_texts() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def train_tokenizer(arch: str, vocab_size: int = 1024):
    """A byte-level BPE tokenizer (no unknown token: any text encodes) wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if arch == "llama" else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    if arch == "llama":
        tok.add_special_tokens(["<pad>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_config(arch: str, tokenizer, max_positions: int = 256):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a tiny model and its tokenizer to `out_dir` (a Hugging Face model folder); returns it."""

    AutoModelForCausalLM = _transformers().AutoModelForCausalLM  # noqa: N806  (quiet: no progress bars)
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}")
    tokenizer = train_tokenizer(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
