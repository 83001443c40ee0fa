"""Conversations as datasets hold them, as the {role, content} messages a chat template reads.

data.message_fields names the keys of role and content (ShareGPT: {role: from, content: value}); data.roles maps
the data's roles onto system/user/assistant/tool (ShareGPT: {human: user, gpt: assistant}); data.train_field names
a per-message key whose false/0 takes that turn out of the loss and true/1 puts it in (whatever data.train_on says).
Every row is checked before anything is tokenized: one line names the row, the message, the key and the fix.
"""

from __future__ import annotations

import json

from launcher.config import DataConfig

CHAT_ROLES = ("system", "user", "assistant", "tool")


class MessageMap:
    """The mapping of one source's messages (picklable: tokenizing workers use it)."""

    def __init__(self, cfg: DataConfig):
        self.role_key = cfg.message_fields.get("role", "role")
        self.content_key = cfg.message_fields.get("content", "content")
        self.roles, self.train_field = dict(cfg.roles), cfg.train_field

    @property
    def identity(self) -> tuple:
        return (self.role_key, self.content_key, sorted(self.roles.items()), self.train_field)

    def canonical(self, messages: list[dict]) -> tuple[list[dict], list[bool | None]]:
        """Each message as {role, content} (its other keys kept, but not Arrow's nulls for keys other rows have), and
        each one's flag: True (trains), False (does not), or None where data.train_on decides."""
        out, flags = [], []
        for message in messages:
            flag = message.get(self.train_field) if self.train_field else None
            kept = {k: v for k, v in message.items() if v is not None and k not in (self.role_key, self.content_key)}
            role = message[self.role_key]
            out.append({**kept, "role": self.roles.get(role, role), "content": message[self.content_key]})
            flags.append(None if flag is None else bool(flag))
        return out, flags

    def problem(self, number: int, message) -> str | None:
        """What is wrong with message `number` (1-based) of a row: "KEY: what; fix" (None if it is fine)."""
        if not isinstance(message, dict):
            return f"data.message_fields: message {number} is not an object; give every message {{{self.role_key}, {self.content_key}}}"
        for what, key in (("role", self.role_key), ("content", self.content_key)):
            value = message.get(key)
            if value is None:
                present = ", ".join(k for k, v in message.items() if v is not None)
                hint = " (ShareGPT: data.message_fields: {role: from, content: value})" if "from" in message and "value" in message else ""
                return (
                    f"data.message_fields: message {number} has no '{key}' key (its keys: {present}); set data.message_fields.{what}"
                    f" to the key that holds the {what}{hint}"
                )
            if not isinstance(value, str):
                return f"data.message_fields: message {number}'s '{key}' is {describe(value)}, not text; make the {what} a string"
        role = self.roles.get(message[self.role_key], message[self.role_key])
        if role not in CHAT_ROLES:
            mapped = f" (data.roles maps '{message[self.role_key]}' to it)" if message[self.role_key] in self.roles else ""
            example = "{human: user, gpt: assistant}" if role in ("human", "gpt") else f"{{{role}: assistant}}"
            return f"data.roles: message {number} has the unknown role '{role}'{mapped}; map it to one of {', '.join(CHAT_ROLES)} with data.roles, e.g. {example}"
        if self.train_field is not None:
            flag = message.get(self.train_field)
            if flag is not None and not (isinstance(flag, bool) or (isinstance(flag, (int, float)) and flag in (0, 1))):
                return (
                    f"data.train_field: message {number}'s '{self.train_field}' is {describe(flag)}; make it true/false or 0/1"
                    " (a turn trains fully or not at all)"
                )
        return None


def describe(value) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"
