"""The chat layout as token ids: system prompt, frame markers, question, end of turn.

The one builder of the sequence a session's cache holds; tests and the embedded model's
training use it too. Each piece is tokenised on its own (the cache is built piece by piece).
"""
from __future__ import annotations

from ..adapters.base import ChatFormat


class Prompt:
    def __init__(self, tokenizer, chat: ChatFormat):
        self.tokenizer, self.chat = tokenizer, chat
        self.end_of_turn = self.ids(chat.end_of_turn)
        self._suffix = self.ids(chat.frame_suffix)

    def ids(self, text: str, special: bool = False) -> list[int]:
        """Token ids of one chat piece; `special` adds the tokenizer's BOS (the system prompt only)."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def system(self, system_prompt: str) -> list[int]:
        return self.ids(self.chat.system.format(system_prompt), special=True)

    def frame(self, t: float) -> tuple[list[int], list[int]]:
        """Ids before and after a frame's visual tokens (the timestamp marker)."""
        return self.ids(self.chat.frame_prefix.format(t)), list(self._suffix)

    def question(self, question: str) -> list[int]:
        return self.ids(self.chat.user.format(question))
