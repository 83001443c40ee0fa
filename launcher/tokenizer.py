"""Tokenizers: the built-in byte-level one, or a Hugging Face tokenizer (`tokenizer:`, or model.pretrained's own).

The documented rule, the same for both: a document becomes `tokenizer(text)` with the tokenizer's own
special tokens (BOS where it adds one, as Llama's does; GPT-2's adds none), followed by EOS unless the
tokenizer already ended it with one. Padding uses the tokenizer's pad id, or its EOS id when it has
none; a padded position is never a target, so its id only has to be a valid one.
"""

from __future__ import annotations

import hashlib
import json

from launcher.config import Config
from launcher.errors import UsageError


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus an end-of-document token. Lossless and needs no download."""

    eos_id = 256
    bos_id = None
    pad_id = 0
    vocab_size = 257
    name = "byte-level (257 ids)"
    identity = "byte-level-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) + [self.eos_id] for text in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    # chat templates write text: in it, EOS is spelled like GPT-2's end-of-text token
    eos_token, bos_token, chat_template = "<|endoftext|>", None, None

    def encode_texts(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Rendered chat text: its ids (`eos_token` becomes the EOS id) and each id's first character."""
        out = []
        for text in texts:
            ids, starts, at = [], [], 0
            for k, piece in enumerate(text.split(self.eos_token)):
                if k:
                    ids.append(self.eos_id)
                    starts.append(at)
                    at += len(self.eos_token)
                for offset, char in enumerate(piece):
                    n = len(char.encode("utf-8"))
                    ids += char.encode("utf-8")
                    starts += [at + offset] * n
                at += len(piece)
            out.append((ids, starts))
        return out


class HFTokenizer:
    """A Hugging Face fast tokenizer, applied in batches, with the EOS/BOS and padding rule above."""

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source
        if tokenizer.eos_token_id is None:
            raise UsageError(
                f"tokenizer: '{source}' has no EOS token, so documents cannot be separated; give it an eos_token"
                " in tokenizer_config.json or use another tokenizer"
            )
        self.eos_id = tokenizer.eos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.bos_id = probe[0] if len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)  # added tokens included: the largest id is vocab_size - 1
        bos = f", BOS {self.bos_id} added" if self.bos_id is not None else ", no BOS"
        pad = f"pad {tokenizer.pad_token_id}" if tokenizer.pad_token_id is not None else f"no pad token (pads with EOS {self.eos_id})"
        self.name = f"{source} ({type(tokenizer).__name__}, {self.vocab_size} ids, EOS {self.eos_id}{bos}, {pad})"
        # what decides the ids: the whole tokenizer (vocabulary, merges, normalizer, templates) and the rule
        backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer.get_vocab())
        rule = json.dumps([self.eos_id, self.bos_id, self.pad_id, self.vocab_size])
        self.identity = hashlib.sha256((backend + rule).encode()).hexdigest()[:16]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if hasattr(backend, "encode_batch_fast"):  # the same ids as tokenizer(texts), without offsets: about twice as fast
            encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
        else:  # verbose=False: long documents are expected here (they are cut into blocks later)
            encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return [ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id] for ids in encoded]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eos_token(self) -> str:
        return self.tokenizer.eos_token

    @property
    def bos_token(self) -> str | None:
        return self.tokenizer.bos_token

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def encode_texts(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        """Ids of each text, with the tokenizer's own special tokens (BOS) or without; no EOS added."""
        return self.tokenizer(texts, add_special_tokens=special_tokens, verbose=False)["input_ids"]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Rendered chat text (the template wrote its special tokens): ids and each id's first character."""
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(ids, [start for start, _ in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]


def tokenizer_source(cfg: Config) -> str | None:
    """Where the tokenizer comes from: `tokenizer`, else model.pretrained's folder, else None (byte-level)."""
    return cfg.tokenizer or cfg.model.pretrained


def load_tokenizer(cfg: Config) -> ByteTokenizer | HFTokenizer:
    source = tokenizer_source(cfg)
    if source is None:
        return ByteTokenizer()
    key = "tokenizer" if cfg.tokenizer else "model.pretrained"  # the config checked that it is a folder or a hub id
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError(f"{key}: Hugging Face tokenizers need the transformers package; pip install -e '.[hf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a folder it cannot read
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"{key}: cannot load a tokenizer from '{source}' ({reason}); point it at a folder with tokenizer.json (or set tokenizer: to one)"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{key}: '{source}' has only a slow (Python) tokenizer; add a tokenizer.json (fast tokenizer)")
    return HFTokenizer(tokenizer, source)
