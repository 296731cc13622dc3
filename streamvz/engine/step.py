"""The contract between the scheduler (event loop) and the runner (worker thread): plain data.

A `Step` is one LM forward: at most one `Row` per session. A row appends, to its session's slot,
the system prompt (first row of a session), frames, a question (opens a turn), or tokens that
extend the open turn (the last sampled token; at the end, the end-of-turn marker). vLLM's
SchedulerOutput / ModelRunnerOutput, shrunk to what a streaming session needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..kv import Block


@dataclass(frozen=True, eq=False)
class FrameIn:
    seq: int
    t: float
    image: np.ndarray  # uint8 [H, W, 3]
    before: tuple[int, ...]  # timestamp marker ids
    after: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class SampleSpec:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # used only on the worker, one per answer


@dataclass(frozen=True, eq=False)
class Row:
    session: str
    slot: int
    system: tuple[int, ...] | None = None  # set on a session's first row: the slot starts afresh
    frames: tuple[FrameIn, ...] = ()
    question: tuple[int, ...] | None = None  # opens a turn
    extend: tuple[int, ...] = ()  # appended to the open turn
    sample: SampleSpec | None = None  # sample the next token from this row's last logits
    meta: dict = field(default_factory=dict)  # kept on the turn block (the question text)
    since_t: float | None = None  # attend only to frames at or after this time (and non-frame rows)


@dataclass(frozen=True)
class Step:
    rows: tuple[Row, ...]


@dataclass
class CacheStats:
    frames_in_window: int = 0
    frames_evicted: int = 0
    cache_tokens: int = 0
    cache_bytes: int = 0
    cache_positions: int = 0
    window_start_t: float | None = None
    window_end_t: float | None = None
    frames_skipped: int = 0  # frames with nothing changed, not written (temporal drop)
    frame_tokens_last: int = 0  # visual tokens of the last frame written
    frame_tokens_mean: float = 0.0  # over every frame written


@dataclass
class RowResult:
    token: int | None = None
    error: Exception | None = None  # the whole row failed (nothing of it is in the cache)
    frame_errors: list | None = None  # per frame of the row: None or the error of that frame
    cache: CacheStats | None = None
    started: bool = False  # the slot holds this session's system prompt now


@dataclass
class StepOutput:
    results: list[RowResult]


@dataclass
class CacheView:
    """A copy of one session's cache, for tests and tools: its blocks and per-layer (keys, values)."""

    blocks: list[Block]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # [1, kv_heads, rows, head_dim] each
    next_position: int
    evicted_frames: int
    evicted_turns: int

    def count(self) -> int:
        return sum(b.tokens for b in self.blocks)

    def frames(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "frame"]
