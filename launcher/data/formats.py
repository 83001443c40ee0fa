"""Formats: how a row becomes one sample of token ids and which of its tokens are targets.

A sample is `ids` and `kinds`, one kind per token: TARGET (the loss counts predicting it), CONTEXT
(it is only read) or START (the first token of a sample: nothing before it predicts it). Format
`text` has no kinds: every token but a document's first is a target.

- prompt_completion: `tokenizer(prompt)` with the tokenizer's special tokens (BOS), then the
  completion's tokens without them, then EOS; the completion and the EOS are the targets.
- chat: the messages (mapped by data.message_fields / data.roles, messages.py) rendered with a chat
  template (the tokenizer's own, `data.chat_template`: a name (templates.py) or a file), tokenized
  once without added special tokens (the template writes them). The trained turns (data.train_on,
  or a message's own data.train_field) are found by rendering incrementally: an assistant turn spans
  from the end of the rendered conversation before it (with the generation prompt, so the assistant
  header is context) to the end of the conversation through it (so its end-of-turn marker is a
  target). A token is a target when its first character lies in such a span.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config import DataConfig
from launcher.data.messages import MessageMap
from launcher.data.templates import DEFAULT_CHAT_TEMPLATE, MARKERS, NAMED_TEMPLATES
from launcher.errors import UsageError

CONTEXT, TARGET, START = 0, 1, 2


def chat_template(cfg: DataConfig, tokenizer) -> str:
    """The template text for format chat: data.chat_template (a name or a file), else the tokenizer's, else
    (byte-level) the default."""
    choice = cfg.chat_template
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice]
    if choice is not None:
        path = Path(choice)
        if not path.is_file():
            if path.suffix or len(path.parts) > 1:
                raise UsageError(
                    f"data.chat_template: file '{choice}' not found; give a Jinja file, a template name, or null for the tokenizer's own"
                )
            raise UsageError(
                f"data.chat_template: no template is named '{choice}' (names: {', '.join(NAMED_TEMPLATES)}); use one of them,"
                " a Jinja file, or null for the tokenizer's own"
            )
        return path.read_text()
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if getattr(tokenizer, "tokenizer", None) is None:  # the byte-level tokenizer has no template of its own
        return DEFAULT_CHAT_TEMPLATE
    raise UsageError(
        f"data.chat_template: tokenizer '{tokenizer.source}' has no chat template; set data.chat_template to a name"
        f" ({', '.join(NAMED_TEMPLATES)}) or a Jinja file: the template the model will be prompted with"
    )


def trained_template(cfg: DataConfig, tokenizer) -> str | None:
    """The chat template a run trains with (format chat), to write into its exported tokenizer; None otherwise."""
    return chat_template(cfg, tokenizer) if cfg.format == "chat" else None


def unknown_markers(cfg: DataConfig, tokenizer) -> str | None:
    """A warning when a named template's special tokens are not single tokens of the (Hugging Face) tokenizer: the
    model then learns them as pieces, and generation does not stop at the family's end-of-turn id."""
    markers = MARKERS.get(cfg.chat_template) if cfg.format == "chat" else None
    if not markers or getattr(tokenizer, "tokenizer", None) is None:
        return None
    split = [m for m, ids in zip(markers, tokenizer.encode_texts(list(markers), special_tokens=False)) if len(ids) != 1]
    if not split:
        return None
    return (
        f"launcher: warning: data.chat_template: {cfg.chat_template}'s {', '.join(split)} {'is not a token' if len(split) == 1 else 'are not tokens'}"
        f" of tokenizer '{tokenizer.source}' (each becomes several pieces); it trains, but not with the family's ids: use the"
        " family's tokenizer, or add them as special tokens (model.resize_embeddings: true)"
    )


def compile_template(template: str):
    """Jinja as Hugging Face renders chat templates (sandboxed, trimmed blocks, raise_exception available)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise UsageError(f"data.chat_template: the template is not valid Jinja ({err}); fix it") from None


class Encoder:
    """Rows of one format to samples (a `datasets.map` function). Picklable: worker processes compile the template."""

    def __init__(self, cfg: DataConfig, tokenizer, template: str | None):
        self.format, self.train_on, self.tokenizer, self.template = cfg.format, cfg.train_on, tokenizer, template
        self.messages = MessageMap(cfg)
        self._compiled = None

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    @property
    def identity(self) -> tuple:
        """What decides the samples (for the cache key)."""
        chat = (self.messages.identity,) if self.format == "chat" else ()
        return (self.format, self.train_on, self.template, self.tokenizer.identity, *chat)

    def __call__(self, batch: dict) -> dict:
        if self.format == "text":
            return pa_table({"ids": list_array(self.tokenizer.encode_documents(batch["text"]))})
        samples = self.prompt_completion(batch) if self.format == "prompt_completion" else self.chat(batch)
        return {"ids": [ids for ids, _ in samples], "kinds": [kinds for _, kinds in samples]}

    def prompt_completion(self, batch: dict) -> list[tuple[list[int], list[int]]]:
        prompts = self.tokenizer.encode_texts(batch["prompt"], special_tokens=True)
        completions = self.tokenizer.encode_texts(batch["completion"], special_tokens=False)
        eos = self.tokenizer.eos_id
        return [with_start(p + c + [eos], [CONTEXT] * len(p) + [TARGET] * (len(c) + 1)) for p, c in zip(prompts, completions)]

    def chat(self, batch: dict) -> list[tuple[list[int], list[int]]]:
        rendered = [self.render(*self.messages.canonical(messages)) for messages in batch["messages"]]
        samples = []
        for (ids, starts), (_, base, spans) in zip(self.tokenizer.encode_with_offsets([text for text, _, _ in rendered]), rendered):
            other = CONTEXT if base == TARGET else TARGET
            kinds = [other if any(a <= s < b for a, b in spans) else base for s in starts]
            samples.append(with_start(ids, kinds))
        return samples

    def trained(self, messages: list[dict], flags: list[bool | None]) -> list[bool]:
        """Which turns the loss counts: a turn's own flag (data.train_field), else data.train_on."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        rule = {
            "all": lambda i, m: True,
            "assistant": lambda i, m: m["role"] == "assistant",
            "last_assistant": lambda i, m: i == last,
        }[self.train_on]
        return [rule(i, m) if flag is None else flag for i, (m, flag) in enumerate(zip(messages, flags))]

    def render(self, messages: list[dict], flags: list[bool | None] | None = None) -> tuple[str, int, list[tuple[int, int]]]:
        """The conversation's text, the kind of its tokens by default (TARGET under train_on: all, else CONTEXT), and
        the character spans of the turns that are the other kind."""
        from jinja2.exceptions import TemplateError

        if self._compiled is None:
            self._compiled = compile_template(self.template)
        specials = {"bos_token": self.tokenizer.bos_token or "", "eos_token": self.tokenizer.eos_token}

        def text(upto: int, generation_prompt: bool) -> str:
            try:
                return self._compiled.render(messages=messages[:upto], add_generation_prompt=generation_prompt, **specials)
            except TemplateError as err:
                raise UsageError(f"data.chat_template: rendering a conversation failed ({err}); fix the template or the data") from None

        base = TARGET if self.train_on == "all" else CONTEXT
        full, spans = text(len(messages), False), []
        for i, (message, trained) in enumerate(zip(messages, self.trained(messages, flags or [None] * len(messages)))):
            if trained == (base == TARGET):
                continue
            # an assistant turn starts after the generation prompt (its header is context); any other after the text before it
            before, through = text(i, message["role"] == "assistant"), text(i + 1, False)
            if not (through.startswith(before) and full.startswith(through)):
                raise UsageError(
                    "data.chat_template: the template does not render a conversation as the growing text of its turns"
                    " (the text before a turn is not a prefix of the text through it), so trained turns cannot be"
                    " found; use a template that renders turns in order, or data.train_on: all"
                )
            spans.append((len(before), len(through)))
        return full, base, spans


def list_array(lists: list[list[int]]):
    """int32 lists as one Arrow array, built in C (datasets' own conversion of Python lists is several times slower)."""
    import itertools

    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(pa.list_(pa.int32()))


def pa_table(columns: dict):
    import pyarrow as pa

    return pa.table(columns)


def with_start(ids: list[int], kinds: list[int]) -> tuple[list[int], list[int]]:
    if kinds:
        kinds[0] = START
    return ids, kinds
