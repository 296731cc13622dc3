"""A rolling KV cache: attention sink (system prompt) + a window of frames + the conversation.

The cache is a `DynamicCache` that also knows what its tokens are: an ordered list of
blocks tagged "system", "frame" or "turn". Before new tokens go in, `append`/`grow`
make room by evicting whole blocks (StreamingLLM's policy, applied to frames):

  1. turns (question + answer) beyond `turn_share` of the budget: oldest closed turn first;
  2. frames beyond `max_frames`, or while the cache would exceed `budget_tokens`:
     oldest frame first; only when no frame is left, oldest closed turns.
The system prompt and the turn being written are never evicted.

Positions stay contiguous: after an eviction, every kept key is rotated back by the
number of positions that vanished in front of it (RoPE is a rotation, so
R(-d) R(p) k = R(p - d) k), so the cache spans at most `budget_tokens` positions however
long the stream runs. For M-RoPE (Qwen2.5-VL) all three position components move by the
same d, which is the same rotation of every frequency pair, so the same code applies.
Blocks therefore record `span` (positions) apart from `tokens`: an M-RoPE frame of k
tokens spans fewer than k positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import StreamError

KINDS = ("system", "frame", "turn")


@dataclass
class Block:
    kind: str
    start: int  # first position
    tokens: int  # rows in the KV tensors
    span: int  # positions it occupies
    meta: dict = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.span


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The language model's RoPE inverse frequencies (one per rotated pair)."""
    return model.get_decoder().rotary_emb.inv_freq.detach().float().cpu()


class RollingCache(DynamicCache):
    def __init__(self, config, inv_freq: torch.Tensor, budget_tokens: int,
                 max_frames: int | None = None, turn_share: float = 0.5):
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise ValueError("RollingCache needs full-attention layers (no sliding windows)")
        self.inv_freq = inv_freq.float()
        self.budget_tokens = budget_tokens
        self.max_frames = max_frames
        self.turn_share = turn_share
        self.blocks: list[Block] = []
        self.evicted_frames = 0
        self.evicted_turns = 0

    # -- bookkeeping -------------------------------------------------------------------
    def count(self, kind: str | None = None) -> int:
        return sum(b.tokens for b in self.blocks if kind is None or b.kind == kind)

    def frames(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "frame"]

    @property
    def next_position(self) -> int:
        return self.blocks[-1].end if self.blocks else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    # -- writing -------------------------------------------------------------------------
    def append(self, kind: str, tokens: int, span: int | None = None, **meta) -> int:
        """Register a new block of `tokens` rows about to be written; returns its start position.

        The caller then runs the model over exactly those rows with this cache.
        """
        return self.append_many([(kind, tokens, span, meta)])[0]

    def append_many(self, specs: list[tuple[str, int, int | None, dict]]) -> list[int]:
        """Register consecutive blocks [(kind, tokens, span, meta)] of one kind, written by one model
        call; room is made for all of them at once (none of them is evicted for another)."""
        kind = specs[0][0]
        assert kind in KINDS and all(k == kind for k, *_ in specs), specs
        self._make_room(sum(t for _, t, _, _ in specs), kind, open_turn=False, blocks=len(specs))
        starts = []
        for _, tokens, span, meta in specs:
            starts.append(self.next_position)
            self.blocks.append(Block(kind, starts[-1], tokens, tokens if span is None else span, meta))
        return starts

    def grow(self, tokens: int) -> int:
        """Extend the last block (a turn being decoded) by `tokens` rows; returns their start position."""
        assert self.blocks and self.blocks[-1].kind == "turn", "grow() extends an open turn"
        self._make_room(tokens, "turn", open_turn=True)
        last = self.blocks[-1]
        start = last.end
        last.tokens += tokens
        last.span += tokens
        return start

    def discard(self, blocks: int = 0, tokens: int = 0) -> None:
        """Undo the last `append_many` (its `blocks`) or `grow` (`tokens`) whose model call failed,
        dropping whatever rows it had written, so the session's cache stays usable."""
        if blocks:
            del self.blocks[-blocks:]
        elif tokens:
            self.blocks[-1].tokens -= tokens
            self.blocks[-1].span -= tokens
        n = self.count()
        for layer in self.layers:  # rows the failed call wrote (some layers may have none)
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    def check(self) -> None:
        """The model wrote exactly the rows the blocks describe."""
        if self.get_seq_length() != self.count():
            raise RuntimeError(f"cache holds {self.get_seq_length()} rows, blocks say {self.count()}")

    # -- policy --------------------------------------------------------------------------
    def _make_room(self, tokens: int, kind: str, open_turn: bool, blocks: int = 1) -> None:
        # Blocks that may go: everything but the system prompt and the turn being written.
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
        if victims:
            self._evict(victims)

    def _evict(self, victims: set[int]) -> None:
        keep_rows, shifts, kept = [], [], []
        row, pos = 0, 0
        for b in self.blocks:
            if id(b) in victims:
                self.evicted_frames += b.kind == "frame"
                self.evicted_turns += b.kind == "turn"
            else:
                keep_rows.append(torch.arange(row, row + b.tokens))
                shifts.append(torch.full((b.tokens,), b.start - pos))
                b.start = pos
                pos += b.span
                kept.append(b)
            row += b.tokens
        self.blocks = kept
        keep = torch.cat(keep_rows) if keep_rows else torch.zeros(0, dtype=torch.long)
        shift = torch.cat(shifts) if shifts else torch.zeros(0, dtype=torch.long)
        moved = int((shift != 0).nonzero()[0, 0]) if bool((shift != 0).any()) else len(shift)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            keys = layer.keys.index_select(-2, keep.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, keep.to(layer.values.device))
            if moved < len(shift):  # kept rows before the first gap keep their positions
                keys[..., moved:, :] = self._rotate_back(keys[..., moved:, :], shift[moved:])
            layer.keys = keys

    def _rotate_back(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Rotate RoPE'd keys [..., L, D] from position p to p - shift (per row), in fp32."""
        angle = shift.to(keys.device, torch.float32)[:, None] * self.inv_freq.to(keys.device)[None, :]
        angle = torch.cat((angle, angle), dim=-1)  # the rotate_half layout: pairs (i, i + D/2)
        cos, sin = angle.cos(), angle.sin()
        k = keys.float()
        half = k.shape[-1] // 2
        k_rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return (k * cos - k_rot * sin).to(keys.dtype)
