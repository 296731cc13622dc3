"""Every engine setting and limit, defined once: the engine, the protocol's limits, the serve
config and the CLI read their defaults from here."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import StreamError


@dataclass(frozen=True)
class EngineConfig:
    tokens_per_frame: int | None = 64  # VisionZip's k per frame (None: the model's own tokens)
    window_frames: int | None = None  # frames kept in a session's window (None: as many as the budget holds)
    cache_budget_tokens: int | None = None  # rows per session (None: the model's max positions)
    max_sessions: int = 16  # KV slots: memory is max_sessions x budget, stated up front
    max_question_chars: int = 2000
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 128  # an ask without max_new_tokens gets min(this, the limit)
    turn_share: float = 0.5  # closed turns may hold at most this share of the budget
    max_batch_frames: int = 8  # frames encoded in one vision batch (one step)
    max_prefill_frames: int = 8  # frames of one session prefilled in one step
    max_batch_rows: int | None = None  # sessions in one LM forward (None: all; 1 is the unbatched path)
    decode_steps_per_frame_step: int = 8  # while answers run, frames join every n-th step
    max_backlog_frames: int = 8  # submitted frames queued per session before the oldest is dropped
    max_queued_questions: int = 8  # questions queued per session
    system_share: float = 0.25  # the system prompt may take at most this share of the budget
    # Static cameras (streamvz/temporal.py): "drop" writes only the tokens that changed since the last frame
    temporal: str = "off"  # "off" | "drop"
    temporal_threshold: float = 0.08  # changed: best cosine similarity to the last frame below 1 - this
    key_frame_every: int = 30  # frames between key frames (all tokens kept)
    scene_change: float = 0.3  # more than this share of the picture changed (same place, vs the key frame): a key frame
    temporal_min_tokens: int = 0  # tokens kept from every frame at least (0: a still frame is not written)

    def with_(self, **changes) -> "EngineConfig":
        """A copy with `changes`; an unknown name is a TypeError (a typo must not pass silently)."""
        known = {f.name for f in fields(self)}
        bad = set(changes) - known
        if bad:
            raise TypeError(f"unknown engine settings: {', '.join(sorted(bad))}")
        return replace(self, **changes)

    def check_ask(self, question, max_new_tokens, temperature, top_p, since) -> int:
        """Validate a question's arguments against the limits; returns max_new_tokens (the default
        when None: `default_max_new_tokens`, or the limit if lower)."""
        if max_new_tokens is None:
            max_new_tokens = min(self.default_max_new_tokens, self.max_new_tokens_limit)
        if not isinstance(question, str) or not question.strip():
            raise StreamError("bad_question", "the question must be a non-empty string")
        if len(question) > self.max_question_chars:
            raise StreamError("question_too_long", f"questions are limited to {self.max_question_chars} characters")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise StreamError("bad_argument", "max_new_tokens must be a positive integer")
        if max_new_tokens > self.max_new_tokens_limit:
            raise StreamError("max_new_tokens_too_large", f"max_new_tokens is limited to {self.max_new_tokens_limit}")
        if not 0.0 <= float(temperature) <= 10.0 or not 0.0 < float(top_p) <= 1.0:
            raise StreamError("bad_argument", "temperature must be in [0, 10] and top_p in (0, 1]")
        if since is not None and not (isinstance(since, (int, float)) and since > 0):
            raise StreamError("bad_argument", "since must be a positive number of seconds")
        return max_new_tokens


DEFAULTS = EngineConfig()
