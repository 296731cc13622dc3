"""Session and answer state: plain objects owned by the engine's event loop.

Only the loop changes them (the scheduler picks work from them, the engine applies each step's
results to them); the worker thread sees immutable `Step` rows, never these objects.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .step import CacheStats, SampleSpec

END = object()  # the last item of an answer's queue


@dataclass(eq=False)  # removed from queues by identity (numpy arrays do not compare to bool)
class QueuedFrame:
    image: np.ndarray  # uint8 [H, W, 3]
    t: float
    seq: int  # order among this session's frames and questions
    done: asyncio.Future | None = None  # set when prefilled (add_frame); None for submit_frame


class AnswerState:
    """One question's generation: queued -> prefill -> decode -> closing -> ended.

    `closing` means the last token is known and the turn's end (the last token shown but not yet
    fed, plus the end-of-turn marker) still has to go into the cache; the answer ends after that,
    so whoever reads the cache after an answer sees the whole turn.
    """

    def __init__(self, aid: int, session: str, question: str, question_ids: list[int], max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None, seq: int, detok, eos: set[int],
                 since_t: float | None = None):
        self.id, self.session, self.question, self.seq = aid, session, question, seq
        self.question_ids = question_ids
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.since_t = since_t
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**63)
        self.detok, self.eos = detok, eos
        self.phase = "queued"
        self.cancelled = False
        self.pending: int | None = None  # last sampled token, shown but not yet in the cache
        self.sampled = 0  # tokens sampled, EOS included (what max_new_tokens counts)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.t_ask = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.token_times: list[float] = []  # perf_counter() when each token reached the loop
        self.queue: asyncio.Queue = asyncio.Queue()

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    def spec(self) -> SampleSpec:
        return SampleSpec(self.temperature, self.top_p, self.generator)

    def closing_ids(self, end_of_turn: list[int]) -> list[int]:
        return ([self.pending] if self.pending is not None else []) + end_of_turn

    def take(self, token: int) -> None:
        """A token sampled for this answer: stream it, or start closing on EOS / the length limit."""
        self.sampled += 1
        self.token_times.append(time.perf_counter())
        if token in self.eos:
            self.pending = None
            self.close("stop")
            return
        now = time.perf_counter()
        self.token_ids.append(token)
        self.t_first = self.t_first or now
        self.t_last = now
        self.pending = token
        self.phase = "decode"
        delta = self.detok.push(token)
        if delta:
            self.queue.put_nowait(delta)
        if self.sampled >= self.max_new_tokens:
            self.close("length")

    def close(self, reason: str) -> None:
        self.finish_reason = self.finish_reason or reason
        self.phase = "closing"

    def end(self, reason: str | None = None, error: BaseException | None = None) -> None:
        if self.phase == "ended":
            return
        self.phase = "ended"
        self.finish_reason = reason or self.finish_reason
        n = len(self.token_ids)
        # Decode rate between the first and the last token: undefined (None) for a one-token answer.
        rate = (n - 1) / (self.t_last - self.t_first) if n > 1 and self.t_last > self.t_first else None
        self.usage = dict(prompt_tokens=len(self.question_ids), completion_tokens=n,
                          ttft_s=None if self.t_first is None else self.t_first - self.t_ask,
                          tokens_per_s=rate, total_s=time.perf_counter() - self.t_ask,
                          finish_reason=self.finish_reason)
        if error is not None:
            self.queue.put_nowait(error)
        self.queue.put_nowait(END)


@dataclass(eq=False)
class SessionState:
    id: str
    system_prompt: str
    system_ids: list[int]
    slot: int
    started: bool = False  # the system prompt is in the slot
    closed: bool = False
    frames: deque = field(default_factory=deque)  # QueuedFrame backlog, oldest first
    answers: deque = field(default_factory=deque)  # AnswerState queue, oldest first
    active: AnswerState | None = None
    in_flight: bool = False  # a row of this session is in the running step
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight
    frame_futures: dict = field(default_factory=dict)  # seq -> future of an add_frame waiting for it
    frames_seen: int = 0
    frames_dropped: int = 0
    seq: int = 0
    t0: float = field(default_factory=time.monotonic)
    cache: CacheStats = field(default_factory=CacheStats)  # as of the last step that touched the slot

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def first_question_seq(self) -> int | None:
        return self.answers[0].seq if self.answers else None

    def since_t(self, since: float | None) -> float | None:
        """Stream time from which a question scoped to the last `since` seconds sees frames: the
        newest frame queued so far (else the newest in the window) minus `since`."""
        if since is None:
            return None
        last = self.frames[-1].t if self.frames else self.cache.window_end_t
        return (last if last is not None else 0.0) - float(since)

    def stats(self) -> dict:
        c = self.cache
        span = None if c.window_start_t is None else c.window_end_t - c.window_start_t
        return dict(frames_seen=self.frames_seen, frames_in_window=c.frames_in_window,
                    frames_dropped=self.frames_dropped, frames_evicted=c.frames_evicted,
                    frames_pending=len(self.frames), cache_tokens=c.cache_tokens, cache_bytes=c.cache_bytes,
                    cache_positions=c.cache_positions, window_span_s=span, frames_skipped=c.frames_skipped,
                    frame_tokens_last=c.frame_tokens_last, frame_tokens_mean=round(c.frame_tokens_mean, 2))
