"""A session: one stream's frames and conversation in one rolling KV cache, and its answers.

The session is the caller's handle; all model work happens in the engine's worker thread
(see engine.py). Everything here runs on the event loop: queues, futures, validation.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import StreamError
from .images import check_image

_END = object()


@dataclass(eq=False)  # removed from queues by identity (numpy arrays do not compare to bool)
class Frame:
    image: np.ndarray  # uint8 [H, W, 3]
    t: float
    seq: int  # order among this session's frames and questions
    done: asyncio.Future | None = None  # set when prefilled (add_frame); None for submit_frame


class Answer:
    """An answer being generated: `async for delta in answer` yields text deltas.

    `usage` is set when generation ends; `token_ids` are the answer's tokens (EOS excluded).
    """

    def __init__(self, session, question: str, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, seq: int):
        self.session, self.question, self.seq = session, question, seq
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**63))
        self.token_ids: list[int] = []
        self.text = ""
        self.usage: dict | None = None
        self.cancelled = False
        self.prompt_tokens = 0
        self.sampled = 0  # tokens sampled, EOS included (what max_new_tokens counts)
        self.pending: int | None = None  # last sampled token, shown but not yet in the cache
        self.started = False  # the question is in the cache
        self.finish_reason: str | None = None
        self.t_ask = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False

    def cancel(self) -> None:
        """Stop generating; the partial answer stays in the conversation. Safe to call any time."""
        if not self._ended and not self.cancelled:
            self.cancelled = True
            self.session._engine._wake_up()

    @property
    def done(self) -> bool:
        return self._ended

    def __aiter__(self):
        self.session._engine._ensure_running()
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(_END)
            raise item
        return item

    async def result(self) -> str:
        """The whole answer text (consumes the deltas)."""
        async for _ in self:
            pass
        return self.text

    # -- called by the engine on the event loop --
    def _emit(self, delta: str) -> None:
        if delta:
            self._queue.put_nowait(delta)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.finish_reason = reason
        end = time.perf_counter()
        n = len(self.token_ids)
        # Decode rate between the first and the last token: undefined (None) for a one-token answer.
        rate = (n - 1) / (self.t_last - self.t_first) if n > 1 and self.t_last > self.t_first else None
        self.usage = dict(prompt_tokens=self.prompt_tokens, completion_tokens=n,
                          ttft_s=None if self.t_first is None else self.t_first - self.t_ask,
                          tokens_per_s=rate, total_s=end - self.t_ask, finish_reason=reason)
        if error is not None:
            self._queue.put_nowait(error)
        self._queue.put_nowait(_END)


@dataclass
class _State:
    """What only the engine touches: the cache and queues."""

    cache: object = None  # RollingCache, made on the worker when the system prompt is prefilled
    frames: deque = field(default_factory=deque)  # Frame backlog, oldest first
    answers: deque = field(default_factory=deque)  # Answer queue, oldest first
    active: Answer | None = None


class Session:
    def __init__(self, engine, session_id: str, system_prompt: str):
        self._engine = engine
        self.id = session_id
        self.system_prompt = system_prompt
        self.closed = False
        self.frames_seen = 0
        self.frames_dropped = 0
        self.t0 = time.monotonic()
        self._seq = 0
        self._state = _State()
        self._idle = asyncio.Event()
        self._idle.set()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _check_open(self) -> None:
        if self.closed:
            raise StreamError("session_closed", f"session {self.id!r} is closed")

    def _stamp(self, t) -> float:
        return time.monotonic() - self.t0 if t is None else float(t)

    async def add_frame(self, image, t: float | None = None) -> None:
        """Encode, compress and prefill one frame; returns once it is in the cache."""
        self._check_open()
        image = check_image(image)
        done = asyncio.get_running_loop().create_future()
        self._state.frames.append(Frame(image, self._stamp(t), self._next_seq(), done))
        self.frames_seen += 1
        self._engine._wake_up()
        await done

    def submit_frame(self, image, t: float | None = None) -> None:
        """Queue a frame without waiting. Past the backlog limit the oldest queued frame is dropped."""
        self._check_open()
        image = check_image(image)
        frames = self._state.frames
        frames.append(Frame(image, self._stamp(t), self._next_seq()))
        self.frames_seen += 1
        droppable = [f for f in frames if f.done is None]
        while len(frames) > self._engine.max_backlog_frames and droppable:
            frames.remove(droppable.pop(0))
            self.frames_dropped += 1
        self._engine._wake_up()

    def ask(self, question: str, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None) -> Answer:
        """Queue a question; it sees every frame added or submitted before it.

        max_new_tokens defaults to 128 (or the engine's limit if lower); seed fixes sampling.
        """
        self._check_open()
        if max_new_tokens is None:
            max_new_tokens = min(128, self._engine.max_new_tokens_limit)
        self._engine._check_question(self, question, max_new_tokens, temperature, top_p)
        answer = Answer(self, question, max_new_tokens, float(temperature), float(top_p), seed, self._next_seq())
        self._state.answers.append(answer)
        self._engine._wake_up()
        return answer

    def stats(self) -> dict:
        cache = self._state.cache
        return dict(
            frames_seen=self.frames_seen,
            frames_in_window=len(cache.frames()) if cache is not None else 0,
            frames_dropped=self.frames_dropped,
            frames_evicted=cache.evicted_frames if cache is not None else 0,
            frames_pending=len(self._state.frames),
            cache_tokens=cache.count() if cache is not None else 0,
            cache_bytes=cache.nbytes() if cache is not None else 0,
            cache_positions=cache.next_position if cache is not None else 0,
        )

    async def close(self) -> None:
        """Cancel what is queued or running, free the cache. Idempotent."""
        if not self.closed:
            self.closed = True
            st = self._state
            err = StreamError("session_closed", f"session {self.id!r} was closed")
            for f in st.frames:
                if f.done is not None and not f.done.done():
                    f.done.set_exception(err)
            st.frames.clear()
            while st.answers:
                st.answers.popleft()._finish("cancelled")
            if st.active is not None:
                st.active.cancel()
            self._engine._wake_up()
        await self._idle.wait()
        self._engine._forget(self)
        self._state.cache = None
