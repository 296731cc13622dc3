"""Which rows go into the next forward: pure bookkeeping, no tensors, no threads, no awaits.

Each step is one LM forward with at most one row per session:
  * every active answer advances: its question prefill, its next token, or its turn's end;
  * frames join, round-robin across sessions (oldest first within a session, up to
    `max_batch_frames` in all and `max_prefill_frames` per session), when no answer is active,
    or every `decode_steps_per_frame_step`-th step while answers run.
Fairness: a burst of frames never stalls an answer (answers advance in every step, the frame
step included), and a long answer never starves frames (they join every n-th step).
Order within a session: a question waits for the frames queued before it; frames that arrive
while it is answered wait until its turn closes (the slot is one sequence).
`max_batch_rows` caps the rows of a step (1 is the unbatched path); a rotating cursor keeps the
cap fair across sessions.
"""
from __future__ import annotations

from .state import SessionState
from .step import FrameIn, Row, Step


class Scheduler:
    def __init__(self, config, frame_ids, end_of_turn: list[int]):
        """`frame_ids(t) -> (before, after)`: the timestamp marker's ids around a frame."""
        self.config, self.frame_ids, self.end_of_turn = config, frame_ids, list(end_of_turn)
        self.decode_steps = 0  # steps with answers since frames last went in
        self.cursor = 0

    def schedule(self, sessions: list[SessionState]) -> Step | None:
        """The next step, or None when there is nothing to do. Frames it takes leave their queues."""
        cfg = self.config
        order = sessions[self.cursor % len(sessions):] + sessions[:self.cursor % len(sessions)] if sessions else []
        self.cursor += 1
        answers = [row for s in order if (row := self.answer_row(s)) is not None]
        frames = self.frame_rows([s for s in order if not s.closed and s.active is None])
        if answers and frames and self.decode_steps + 1 < cfg.decode_steps_per_frame_step:
            frames = []  # answers run: frames wait for their turn of steps
        # Frames that are due go first, so a row cap cannot starve them behind answers.
        rows = (frames + answers)[:cfg.max_batch_rows or None]
        if not rows:
            return None
        took_frames = any(r.frames for r in rows)
        self.decode_steps = 0 if took_frames else self.decode_steps + 1
        by_id = {s.id: s for s in sessions}
        for r in rows:
            s = by_id[r.session]
            taken = {f.seq for f in r.frames}
            if taken:
                for f in [f for f in s.frames if f.seq in taken]:
                    s.frames.remove(f)
            s.in_flight = True
            s.idle.clear()
        return Step(tuple(rows))

    def answer_row(self, s: SessionState) -> Row | None:
        """The active answer's next row (activating the next queued question when its frames are in)."""
        if s.closed:
            return None
        if s.active is None and s.answers:
            nxt = s.answers[0]
            if not any(f.seq < nxt.seq for f in s.frames):
                s.active = s.answers.popleft()
                s.active.phase = "prefill"
        a = s.active
        if a is not None and a.cancelled:
            if a.phase == "prefill":  # its question never went in: nothing to take back
                a.end("cancelled")
                s.active = a = None
            elif a.phase == "decode":  # the partial answer stays in the conversation
                a.close("cancelled")
        if a is None:
            return None
        system = None if s.started else tuple(s.system_ids)
        if a.phase == "prefill":
            return Row(s.id, s.slot, system=system, question=tuple(a.question_ids), sample=a.spec(),
                       meta={"question": a.question}, since_t=a.since_t)
        if a.phase == "decode":
            return Row(s.id, s.slot, extend=(a.pending,), sample=a.spec(), since_t=a.since_t)
        if a.phase == "closing":
            ids = a.closing_ids(self.end_of_turn)
            if not ids:  # nothing to put in (no end-of-turn marker, no pending token): the turn is complete
                a.end()
                s.active = None
                return None
            return Row(s.id, s.slot, extend=tuple(ids))
        return None

    def frame_rows(self, sessions: list[SessionState]) -> list[Row]:
        cfg = self.config
        per_session = min(cfg.max_prefill_frames, cfg.window_frames or cfg.max_prefill_frames)
        queues = []
        for s in sessions:
            limit = s.first_question_seq()
            q = [f for f in s.frames if limit is None or f.seq < limit][:per_session]
            if q:
                queues.append((s, q))
        picked: dict[str, list] = {}
        total, i = 0, 0
        while total < cfg.max_batch_frames and any(i < len(q) for _, q in queues):
            for s, q in queues:
                if i < len(q) and total < cfg.max_batch_frames:
                    picked.setdefault(s.id, []).append(q[i])
                    total += 1
            i += 1
        rows = []
        for s, _ in queues:
            if s.id in picked:
                ins = tuple(FrameIn(f.seq, f.t, f.image, *map(tuple, self.frame_ids(f.t))) for f in picked[s.id])
                rows.append(Row(s.id, s.slot, system=None if s.started else tuple(s.system_ids), frames=ins))
        return rows
