"""Handles the caller holds: a Session (one stream's frames and conversation) and an Answer.

Thin: every call goes to a public engine method; the state behind them belongs to the engine
(engine/state.py) and changes only on the event loop.
"""
from __future__ import annotations

from .engine.state import END


class Answer:
    """An answer being generated: `async for delta in answer` yields text deltas.

    `usage` is set when generation ends; `token_ids` are the answer's tokens (EOS excluded).
    """

    def __init__(self, state, engine):
        self._state, self._engine = state, engine

    question = property(lambda self: self._state.question)
    max_new_tokens = property(lambda self: self._state.max_new_tokens)
    token_ids = property(lambda self: list(self._state.token_ids))
    text = property(lambda self: self._state.text)
    usage = property(lambda self: self._state.usage)
    finish_reason = property(lambda self: self._state.finish_reason)
    done = property(lambda self: self._state.ended)
    token_times = property(lambda self: list(self._state.token_times))  # perf_counter() per token sampled

    def cancel(self) -> None:
        """Stop generating; the partial answer stays in the conversation. Safe to call any time."""
        self._engine.cancel(self._state)

    def __aiter__(self):
        self._engine.start()
        return self

    async def __anext__(self) -> str:
        queue = self._state.queue
        item = await queue.get()
        if item is END:
            queue.put_nowait(END)  # iterating again ends again
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            queue.put_nowait(END)
            raise item
        return item

    async def result(self) -> str:
        """The whole answer text (consumes the deltas)."""
        async for _ in self:
            pass
        return self.text


class Session:
    def __init__(self, engine, state):
        self._engine, self._state = engine, state

    id = property(lambda self: self._state.id)
    system_prompt = property(lambda self: self._state.system_prompt)
    closed = property(lambda self: self._state.closed)
    frames_seen = property(lambda self: self._state.frames_seen)
    frames_dropped = property(lambda self: self._state.frames_dropped)

    async def add_frame(self, image, t: float | None = None) -> None:
        """Encode, compress and prefill one frame; returns once it is in the cache."""
        await self._engine.add_frame(self.id, image, t)

    def submit_frame(self, image, t: float | None = None) -> None:
        """Queue a frame without waiting. Past the backlog limit the oldest queued frame is dropped."""
        self._engine.submit_frame(self.id, image, t)

    def ask(self, question: str, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, since: float | None = None, ignore_eos: bool = False) -> Answer:
        """Queue a question; it sees every frame added or submitted before it, or with `since` only
        those of the last `since` seconds. max_new_tokens defaults to the engine's
        `default_max_new_tokens` (or its limit if lower); seed fixes sampling."""
        return self._engine.ask(self.id, question, max_new_tokens, temperature, top_p, seed, since, ignore_eos)

    def stats(self) -> dict:
        return self._engine.stats(self.id)

    async def cache_view(self):
        """A copy of this session's cache (blocks, keys, values): for tests and tools."""
        return await self._engine.cache_view(self.id)

    async def close(self) -> None:
        """Cancel what is queued or running, free the cache. Idempotent."""
        await self._engine.close_session(self.id)
