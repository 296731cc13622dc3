"""The worker side of a step: one vision batch, then ONE language-model forward over every row.

    execute(step):
      frames of all rows -> adapter.encode_frames_positioned   (one vision batch)
      per row: register its blocks in the slot's BlockTable (room is made first: evictions are
               applied to the store right away), embeddings + positions
      rows left-padded to one width -> adapter.forward(x, store view, positions, 4-D mask)
      sample the rows that asked for a token (each with its own temperature/top_p/generator)

The runner is the one owner of KV memory (the SlotStore) and of each slot's block table; the
event loop only sees the `CacheStats` each row returns. A forward that fails is undone (block
tables rolled back; rows the model wrote are beyond the slots' lengths) and its rows are retried
one by one, a frame row frame by frame, so a bad row fails alone and its batch-mates go on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..errors import StreamError
from ..kv import BlockTable, SlotStore, rope_inv_freq
from ..kv.store import kv_shape
from ..temporal import TemporalConfig, TemporalFilter
from .sampling import sample
from .step import CacheStats, CacheView, Row, RowResult, Step, StepOutput

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    index: int  # the row's place in the step
    row: Row
    table: BlockTable
    enc: dict  # frame j -> (embeds, offsets): the frames this job carries
    embeds: torch.Tensor  # [n, W]
    positions: torch.Tensor  # [n] or [3, n]
    hide: list[tuple[int, int]]  # slot rows this row must not attend to (frames before since_t)
    undo: tuple[str, int]  # ("blocks", k) or ("tokens", k): what a failed forward takes back
    fresh: bool  # the row starts its slot afresh (its table is new until the forward succeeds)


@dataclass
class _FrameCounts:
    """One slot's frames since its session began: written, their visual tokens, the last one's, skipped."""

    written: int = 0
    tokens: int = 0
    last: int = 0
    skipped: int = 0


def internal(e: Exception, what: str) -> StreamError:
    if isinstance(e, StreamError):
        return e
    log.error("%s failed", what, exc_info=e)
    return StreamError("internal_error", f"{what} failed: {type(e).__name__}: {e}")


class Runner:
    def __init__(self, adapter, budget_tokens: int, slots: int, window_frames: int | None, turn_share: float,
                 temporal: TemporalConfig = TemporalConfig()):
        self.adapter = adapter
        self.budget, self.window, self.turn_share = budget_tokens, window_frames, turn_share
        self.store = SlotStore(*kv_shape(adapter.model.config), slots=slots, budget=budget_tokens,
                               dtype=adapter.dtype, device=adapter.device, inv_freq=rope_inv_freq(adapter.model))
        self.tables: dict[int, BlockTable] = {}
        self.temporal = temporal
        self.filters: dict[int, TemporalFilter] = {}  # per slot, when temporal drop is on
        self.counts: dict[int, _FrameCounts] = {}  # per slot

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: Step) -> StepOutput:
        results = [RowResult(frame_errors=[None] * len(r.frames) if r.frames else None) for r in step.rows]
        encoded = self.encode([f for r in step.rows for f in r.frames])
        jobs, k = [], 0
        for i, row in enumerate(step.rows):
            if row.system is not None:  # a new session in this slot
                self.filters.pop(row.slot, None)
                self.counts[row.slot] = _FrameCounts()
            enc = self.drop_unchanged(row.slot, row.frames, encoded[k:k + len(row.frames)])
            k += len(row.frames)
            for j, e in enumerate(enc):
                if isinstance(e, Exception):
                    results[i].frame_errors[j] = e
            good = {j: e for j, e in enumerate(enc) if e is not None and not isinstance(e, Exception)}  # None: skipped
            if row.frames and not good and row.system is None:
                continue
            jobs.append((i, row, good))
        self.run(jobs, results)
        for i, row in enumerate(step.rows):
            results[i].cache = self.stats(row.slot)
        return StepOutput(results)

    def encode(self, frames) -> list:
        """(embeds [k, W], offsets [3, k] | None) per frame, or the frame's error."""
        if not frames:
            return []
        try:
            embeds, offsets = self.adapter.encode_frames_positioned([f.image for f in frames])
            return [(embeds[i], None if offsets is None else offsets[i]) for i in range(len(frames))]
        except Exception as e:  # noqa: BLE001 - one bad frame must not fail its batch-mates
            if len(frames) == 1:
                return [internal(e, "frame encoding")]
            return [r for f in frames for r in self.encode([f])]

    def drop_unchanged(self, slot: int, frames, encoded: list) -> list:
        """Temporal drop: each frame keeps the tokens that changed since the session's previous
        frame (all of them on a key frame); None for a frame where nothing changed."""
        if self.temporal.mode == "off":
            return encoded
        filt = self.filters.setdefault(slot, TemporalFilter(self.temporal))
        out = []
        for f, e in zip(frames, encoded):
            if isinstance(e, Exception):
                out.append(e)
                continue
            embeds, offsets = e
            keep = filt.keep(embeds, f.image)
            if keep is None:
                out.append(e)
            elif len(keep) == 0:
                self.counts.setdefault(slot, _FrameCounts()).skipped += 1
                out.append(None)
            else:
                out.append((embeds[keep], None if offsets is None else offsets[:, keep]))
        return out

    def run(self, jobs: list, results: list[RowResult]) -> None:
        """Forward `jobs` [(index, row, {frame j: encoding})] together; on failure one by one."""
        prepared = []
        for i, row, enc in jobs:
            if row.system is not None and results[i].started:
                row = replace(row, system=None)  # an earlier part of this row brought it in
            try:
                prepared.append(self.prepare(i, row, enc))
            except Exception as e:  # noqa: BLE001 - e.g. context_full: this row only
                self.fail(results[i], row, enc, internal(e, "prefill"))
        if not prepared:
            return
        prepared.sort(key=lambda p: p.row.slot)  # slots in order: the store can hand out a view
        try:
            logits = self.forward(prepared)
        except Exception as e:  # noqa: BLE001
            for p in reversed(prepared):
                self.rollback(p)
            if len(prepared) > 1:
                for p in prepared:
                    self.run([(p.index, p.row, p.enc)], results)
            elif len(prepared[0].enc) > 1:  # a frame row: frame by frame
                p = prepared[0]
                for j, one in p.enc.items():
                    self.run([(p.index, p.row, {j: one})], results)
            else:
                self.fail(results[prepared[0].index], prepared[0].row, prepared[0].enc, internal(e, "model call"))
            return
        for p in prepared:
            self.tables[p.row.slot] = p.table
            results[p.index].started = True
            counts = self.counts.setdefault(p.row.slot, _FrameCounts())
            for e, _ in p.enc.values():
                counts.written, counts.tokens, counts.last = counts.written + 1, counts.tokens + len(e), len(e)
        want = [(p, n) for n, p in enumerate(prepared) if p.row.sample is not None]
        if want:
            tokens = sample(logits[[n for _, n in want]], [p.row.sample for p, _ in want])
            for (p, _), tok in zip(want, tokens):
                results[p.index].token = tok

    @staticmethod
    def fail(result: RowResult, row: Row, enc: dict, err: StreamError) -> None:
        if row.frames:
            for j in enc:
                result.frame_errors[j] = err
        else:
            result.error = err

    # -- rows -> tensors -----------------------------------------------------------------------
    def prepare(self, index: int, row: Row, enc: dict) -> _Prepared:
        """Register the row's blocks (making room first) and build its embeddings and positions."""
        fresh = row.system is not None
        table = BlockTable(self.budget, self.window, self.turn_share) if fresh else self.tables[row.slot]
        if fresh:
            self.store.reset(row.slot)
        pieces, undo = [], ("blocks", 0)
        if row.system:
            (start,), _ = table.append_many([("system", len(row.system), None, {})])
            pieces.append(self.text(row.system, start))
        if enc:
            frames = [(row.frames[j], *enc[j]) for j in sorted(enc)]
            spans = [len(e) if off is None else int(off.max()) + 1 for _, e, off in frames]
            specs = [("frame", len(f.before) + len(e) + len(f.after), len(f.before) + n + len(f.after), {"t": f.t})
                     for (f, e, _), n in zip(frames, spans)]
            starts = self.evict(row.slot, table.append_many(specs))
            for (f, e, off), n, start in zip(frames, spans, starts):
                at = start + len(f.before)
                pieces += [self.text(f.before, start), (e, self.visual_positions(at, len(e), off)),
                           self.text(f.after, at + n)]
            undo = ("blocks", len(specs))
        elif row.question is not None:
            (start,) = self.evict(row.slot, table.append_many([("turn", len(row.question), None, row.meta)]))
            pieces.append(self.text(row.question, start))
            undo = ("blocks", 1)
        elif row.extend:
            start = self.evict(row.slot, table.grow(len(row.extend)))
            pieces.append(self.text(row.extend, start))
            undo = ("tokens", len(row.extend))
        pieces = [p for p in pieces if len(p[0])]
        embeds = torch.cat([e.to(self.adapter.device, self.adapter.dtype) for e, _ in pieces])
        positions = torch.cat([p for _, p in pieces], dim=-1)
        hide = table.frame_rows_before(row.since_t) if row.since_t is not None else []
        return _Prepared(index, row, table, enc, embeds, positions, hide, undo, fresh)

    def evict(self, slot: int, registered):
        """Apply the eviction a registration asked for to the stored rows; pass its start(s) on."""
        starts, ev = registered
        if ev is not None:
            self.store.compact(slot, ev)
        return starts

    def rollback(self, p: _Prepared) -> None:
        if not p.fresh:  # a fresh table was never committed: dropping it is the undo
            kind, n = p.undo
            p.table.discard(**{kind: n})

    def text(self, ids, start: int):
        ids = list(ids)
        e = self.adapter.embed(torch.tensor([ids], dtype=torch.long))[0] if ids else torch.zeros(0)
        return e, self.visual_positions(start, len(ids), None)

    def visual_positions(self, start: int, n: int, offsets) -> torch.Tensor:
        """Positions [n] (or [3, n] for M-RoPE); text and 1-D frames count up, M-RoPE frames use their offsets."""
        if offsets is not None:
            return start + offsets.cpu().long()
        pos = torch.arange(start, start + n)
        return pos.expand(3, n) if self.adapter.rope_dims == 3 else pos

    def forward(self, prepared: list[_Prepared]) -> torch.Tensor:
        """One LM call over every row, left-padded to one width; returns each row's last logits [B, V]."""
        ns = [len(p.embeds) for p in prepared]
        width, dim = max(ns), prepared[0].embeds.shape[-1]
        x = torch.zeros(len(prepared), width, dim, dtype=self.adapter.dtype, device=self.adapter.device)
        three = self.adapter.rope_dims == 3
        pos = torch.zeros((3, len(prepared), width) if three else (len(prepared), width), dtype=torch.long)
        for b, (p, n) in enumerate(zip(prepared, ns)):
            x[b, width - n:] = p.embeds
            pos[..., b, width - n:] = p.positions
        batch = self.store.batch([p.row.slot for p in prepared], ns, width, x.dtype, hide=[p.hide for p in prepared])
        logits = self.adapter.forward(x, batch, pos, attention_mask=batch.mask)
        self.store.commit(batch)
        return logits[:, -1]

    # -- reading -----------------------------------------------------------------------------
    def stats(self, slot: int) -> CacheStats:
        table = self.tables.get(slot)
        if table is None:
            return CacheStats()
        times = [b.meta["t"] for b in table.frames()]
        c = self.counts.get(slot, _FrameCounts())
        return CacheStats(len(times), table.evicted_frames, table.count(), self.store.nbytes(slot),
                          table.next_position, times[0] if times else None, times[-1] if times else None,
                          c.skipped, c.last, c.tokens / c.written if c.written else 0.0)

    def view(self, slot: int) -> CacheView:
        table = self.tables.get(slot) or BlockTable(self.budget)
        return CacheView([replace(b, meta=dict(b.meta)) for b in table.blocks], self.store.rows(slot),
                         table.next_position, table.evicted_frames, table.evicted_turns)
