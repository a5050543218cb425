"""The RWKV World chat template, shared by the server's ``/v1/chat/completions`` and ``rwkvkit
chat``: ``System: ...\\n\\nUser: ...\\n\\nAssistant:``, the names and separator taken from the
model config's ``chat`` keys. A message's own blank lines are folded into single newlines (as
ChatRWKV does), so no message can end its turn early or fake another role's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "System"
    user: str = "User"
    assistant: str = "Assistant"
    separator: str = "\n\n"

    @classmethod
    def of(cls, cfg: Any) -> ChatTemplate:
        """From a config node with the same keys (the model config's ``chat``)."""
        return cls(cfg.system, cfg.user, cfg.assistant, cfg.separator)

    @property
    def stop(self) -> str:
        """Where a reply ends: the start of the next user turn."""
        return f"{self.separator}{self.user}:"

    def clean(self, content: str) -> str:
        text = re.sub(r"\n\s*\n", "\n", content.strip())
        return text.replace(self.separator, "\n") if self.separator.strip() else text

    def history(self, messages: Sequence[tuple[str, str]]) -> str:
        """``messages`` ((role, content) pairs) as turns each ended by the separator: what the
        prompt of every later reply in the conversation starts with."""
        names = {"system": self.system, "user": self.user, "assistant": self.assistant}
        return "".join(f"{names[role]}: {self.clean(content)}{self.separator}" for role, content in messages)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for the assistant's next reply to ``messages``."""
        return f"{self.history(messages)}{self.assistant}:"
