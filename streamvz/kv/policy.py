"""What a session's cache holds and what goes when it is full: StreamingLLM's policy over blocks.

A slot's rows are an ordered list of blocks tagged "system", "frame" or "turn". Before new
rows go in, `append_many`/`grow` make room by evicting whole blocks:

  1. turns (question + answer) beyond `turn_share` of the budget: oldest closed turn first;
  2. frames beyond `max_frames`, or while the cache would exceed `budget_tokens`:
     oldest frame first; only when no frame is left, oldest closed turns.
The system prompt (the attention sink) and the turn being written are never evicted.

Positions stay contiguous: after an eviction every kept block moves forward by the positions
that vanished in front of it (`Eviction.shift`; the store re-rotates its keys, see rope.py), so a
slot spans at most `budget_tokens` positions however long the stream runs. Blocks record
`span` (positions) apart from `tokens` (rows): an M-RoPE frame of k tokens spans fewer than k.
No tensors here: the store applies an `Eviction` to its rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import StreamError

KINDS = ("system", "frame", "turn")


@dataclass
class Block:
    kind: str
    start: int  # first position
    tokens: int  # rows in the KV store
    span: int  # positions it occupies
    meta: dict = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.span


@dataclass(frozen=True)
class Eviction:
    """Rows to keep (in order) and, per kept row, how many positions it moves back."""

    keep: list[int]
    shift: list[int]


class BlockTable:
    def __init__(self, budget_tokens: int, max_frames: int | None = None, turn_share: float = 0.5):
        self.budget_tokens, self.max_frames, self.turn_share = budget_tokens, max_frames, turn_share
        self.blocks: list[Block] = []
        self.evicted_frames = 0
        self.evicted_turns = 0

    # -- reading -------------------------------------------------------------------------
    def count(self, kind: str | None = None) -> int:
        return sum(b.tokens for b in self.blocks if kind is None or b.kind == kind)

    def frames(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "frame"]

    @property
    def next_position(self) -> int:
        return self.blocks[-1].end if self.blocks else 0

    def frame_rows_before(self, t: float) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of the frames older than stream time `t` (a question scoped to recent frames)."""
        out, row = [], 0
        for b in self.blocks:
            if b.kind == "frame" and b.meta.get("t", t) < t:
                out.append((row, row + b.tokens))
            row += b.tokens
        return out

    # -- writing -------------------------------------------------------------------------
    def append_many(self, specs: list[tuple[str, int, int | None, dict]]) -> tuple[list[int], Eviction | None]:
        """Register consecutive blocks [(kind, tokens, span, meta)] of one kind, about to be written
        by one model call; room is made for all of them at once (none is evicted for another).
        Returns their start positions and the eviction to apply to the stored rows first."""
        kind = specs[0][0]
        assert kind in KINDS and all(k == kind for k, *_ in specs), specs
        eviction = self._make_room(sum(t for _, t, _, _ in specs), kind, open_turn=False, blocks=len(specs))
        starts = []
        for _, tokens, span, meta in specs:
            starts.append(self.next_position)
            self.blocks.append(Block(kind, starts[-1], tokens, tokens if span is None else span, dict(meta)))
        return starts, eviction

    def grow(self, tokens: int) -> tuple[int, Eviction | None]:
        """Extend the open turn (the last block) by `tokens` rows; returns their start position."""
        assert self.blocks and self.blocks[-1].kind == "turn", "grow() extends an open turn"
        eviction = self._make_room(tokens, "turn", open_turn=True)
        last = self.blocks[-1]
        start = last.end
        last.tokens += tokens
        last.span += tokens
        return start, eviction

    def discard(self, blocks: int = 0, tokens: int = 0) -> None:
        """Undo the last `append_many` (its `blocks`) or `grow` (`tokens`) whose model call failed."""
        if blocks:
            del self.blocks[-blocks:]
        elif tokens:
            self.blocks[-1].tokens -= tokens
            self.blocks[-1].span -= tokens

    # -- policy --------------------------------------------------------------------------
    def _make_room(self, tokens: int, kind: str, open_turn: bool, blocks: int = 1) -> Eviction | None:
        protected = self.blocks[-1] if open_turn else None
        victims: set[int] = set()

        def alive(k):
            return [b for b in self.blocks if b.kind == k and id(b) not in victims and b is not protected]

        def size():
            return tokens + sum(b.tokens for b in self.blocks if id(b) not in victims)

        incoming_turn = tokens if kind == "turn" else 0
        turns = alive("turn")
        turn_tokens = incoming_turn + sum(b.tokens for b in turns) + (protected.tokens if protected else 0)
        while turns and turn_tokens > self.turn_share * self.budget_tokens:
            victims.add(id(turns[0]))
            turn_tokens -= turns.pop(0).tokens
        frames = alive("frame")
        n_frames = len(frames) + (blocks if kind == "frame" else 0)
        while frames and self.max_frames is not None and n_frames > self.max_frames:
            victims.add(id(frames.pop(0)))
            n_frames -= 1
        while size() > self.budget_tokens:
            # Several new frames at once may only push out frames: one at a time, each new frame
            # would evict older frames (even its batch-mates) before any turn, and so must they.
            pool = alive("frame") or (alive("turn") if blocks == 1 else [])
            if not pool:
                raise StreamError("context_full", f"{tokens} new tokens do not fit a {self.budget_tokens}-token "
                                  "cache next to the system prompt and the current turn")
            victims.add(id(pool[0]))
        return self._evict(victims) if victims else None

    def _evict(self, victims: set[int]) -> Eviction:
        keep, shift, kept = [], [], []
        row = pos = 0
        for b in self.blocks:
            if id(b) in victims:
                self.evicted_frames += b.kind == "frame"
                self.evicted_turns += b.kind == "turn"
            else:
                keep += range(row, row + b.tokens)
                shift += [b.start - pos] * b.tokens
                b.start = pos
                pos += b.span
                kept.append(b)
            row += b.tokens
        self.blocks = kept
        return Eviction(keep, shift)
