"""Incremental detokenization: each new token costs a decode of a few tokens, not the whole answer.

The text of tokens [prefix:] minus the text of [prefix:read] is the new text; both share the
same left context, so tokenizers that merge or strip spaces at a piece's start agree with a
whole-answer decode. A trailing U+FFFD is half a UTF-8 character: wait for the rest.
(vLLM's detokenizer works the same way.)
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        seen = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(seen) or now.endswith("\ufffd"):
            return ""
        delta = now[len(seen):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
