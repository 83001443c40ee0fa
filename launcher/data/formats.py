"""Formats: how a row becomes one sample of token ids and which of its tokens are targets.

A sample is `ids` and `kinds`, one kind per token: TARGET (the loss counts predicting it), CONTEXT
(it is only read) or START (the first token of a sample: nothing before it predicts it). Format
`text` has no kinds: every token but a document's first is a target.

- prompt_completion: `tokenizer(prompt)` with the tokenizer's special tokens (BOS), then the
  completion's tokens without them, then EOS; the completion and the EOS are the targets.
- chat: the conversation rendered with a chat template (the tokenizer's own, `data.chat_template`,
  or the default below), tokenized once without added special tokens (the template writes them).
  Assistant turns are found by rendering incrementally: a turn spans from the end of the rendered
  conversation before it (with the generation prompt, so the assistant header is context) to the
  end of the conversation through it (so its end-of-turn marker is a target). A token is a target
  when its first character lies in such a span.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config import DataConfig
from launcher.errors import UsageError

CONTEXT, TARGET, START = 0, 1, 2

# The launcher's chat template: plain-text role headers; each assistant turn ends with EOS, so a
# model learns to stop. With the byte-level tokenizer, EOS is written <|endoftext|> in the text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_template(cfg: DataConfig, tokenizer) -> str:
    """The template text for format chat: data.chat_template, else the tokenizer's, else (byte-level) the default."""
    choice = cfg.chat_template
    if choice == "default":
        return DEFAULT_CHAT_TEMPLATE
    if choice is not None:
        path = Path(choice)
        if not path.is_file():
            raise UsageError(f"data.chat_template: file '{choice}' not found; give a Jinja file, 'default', or null for the tokenizer's own")
        return path.read_text()
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if getattr(tokenizer, "tokenizer", None) is None:  # the byte-level tokenizer has no template of its own
        return DEFAULT_CHAT_TEMPLATE
    raise UsageError(
        f"data.chat_template: tokenizer '{tokenizer.source}' has no chat template; set data.chat_template to a"
        " Jinja file (the template the model will be prompted with), or to 'default' for the launcher's"
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
        self._compiled = None

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    @property
    def identity(self) -> tuple:
        """What decides the samples (for the cache key)."""
        return (self.format, self.train_on, self.template, self.tokenizer.identity)

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
        texts, spans = zip(*(self.render(messages, self.train_on == "assistant") for messages in batch["messages"]))
        samples = []
        for (ids, starts), turns in zip(self.tokenizer.encode_with_offsets(list(texts)), spans):
            if self.train_on == "all":
                kinds = [TARGET] * len(ids)
            else:
                kinds = [TARGET if any(a <= s < b for a, b in turns) else CONTEXT for s in starts]
            samples.append(with_start(ids, kinds))
        return samples

    def render(self, messages: list[dict], find_turns: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its assistant turns."""
        from jinja2.exceptions import TemplateError

        if self._compiled is None:
            self._compiled = compile_template(self.template)
        specials = {"bos_token": self.tokenizer.bos_token or "", "eos_token": self.tokenizer.eos_token}

        def text(upto: int, generation_prompt: bool) -> str:
            try:
                return self._compiled.render(messages=messages[:upto], add_generation_prompt=generation_prompt, **specials)
            except TemplateError as err:
                raise UsageError(f"data.chat_template: rendering a conversation failed ({err}); fix the template or the data") from None

        full, spans = text(len(messages), False), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not find_turns:
                continue
            before, through = text(i, True), text(i + 1, False)
            if not (through.startswith(before) and full.startswith(through)):
                raise UsageError(
                    "data.chat_template: the template does not render a conversation as the growing text of its turns"
                    " (the text before an assistant turn is not a prefix of the text through it), so assistant turns"
                    " cannot be found; use a template that renders turns in order, or data.train_on: all"
                )
            spans.append((len(before), len(through)))
        return full, spans


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
