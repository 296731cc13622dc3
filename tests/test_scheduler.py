"""The scheduler on plain state, no model: which rows each step carries (fairness, order, caps)."""
import numpy as np

from streamvz.config import EngineConfig
from streamvz.engine.scheduler import Scheduler
from streamvz.engine.state import AnswerState, QueuedFrame, SessionState

EOT = [99]
IMG = np.zeros((2, 2, 3), np.uint8)


def marker(t):
    return [int(t)], [0]


def session(sid, slot, started=True):
    return SessionState(sid, "sys", [1, 2], slot, started=started)


def add_frames(s, times):
    for t in times:
        s.frames.append(QueuedFrame(IMG, float(t), s.next_seq()))


def add_question(s, ids=(5, 6)):
    a = AnswerState(len(s.answers) + 1, s.id, "q", list(ids), 8, 0.0, 1.0, None, s.next_seq(), None, {0})
    s.answers.append(a)
    return a


def finish_step(step, sessions):
    for s in sessions:
        s.in_flight = False
        s.started = True


def kinds(step):
    return {r.session: ("frames" if r.frames else "question" if r.question else "extend") for r in step.rows}


def test_nothing_to_do_is_none():
    assert Scheduler(EngineConfig(), marker, EOT).schedule([session("a", 0)]) is None


def test_answers_advance_every_step_and_frames_join_every_nth():
    sch = Scheduler(EngineConfig(decode_steps_per_frame_step=3), marker, EOT)
    a, b = session("a", 0), session("b", 1)
    ans = add_question(a)
    add_frames(b, range(20))
    seen = []
    for _ in range(9):
        step = sch.schedule([a, b])
        seen.append(kinds(step))
        finish_step(step, [a, b])
        if ans.phase == "prefill":
            ans.phase, ans.pending = "decode", 7  # as if a token was sampled
    assert all(k["a"] in ("question", "extend") for k in seen)  # never stalled by frames
    # frames go in at the first step (no answer active yet? it is: the question starts at once),
    # then every third step
    assert [("b" in k) for k in seen] == [False, False, True, False, False, True, False, False, True]


def test_frames_alone_go_in_every_step_round_robin_with_caps():
    cfg = EngineConfig(max_batch_frames=5, max_prefill_frames=3)
    sch = Scheduler(cfg, marker, EOT)
    ss = [session(x, i) for i, x in enumerate("abc")]
    for s in ss:
        add_frames(s, range(4))
    step = sch.schedule(ss)
    got = {r.session: [f.t for f in r.frames] for r in step.rows}
    assert sum(len(v) for v in got.values()) == 5  # max_batch_frames
    assert sorted(len(v) for v in got.values()) == [1, 2, 2]  # round-robin: first frames of all, then seconds
    assert all(v == sorted(v) and v[0] == 0.0 for v in got.values())  # oldest first within a session
    assert [len(s.frames) for s in ss] == [4 - len(got[s.id]) for s in ss]  # taken frames left their queues


def test_window_caps_frames_per_row():
    sch = Scheduler(EngineConfig(window_frames=2, max_prefill_frames=8), marker, EOT)
    s = session("a", 0)
    add_frames(s, range(5))
    assert [len(r.frames) for r in sch.schedule([s]).rows] == [2]


def test_question_waits_for_its_frames_and_later_frames_wait_for_the_turn():
    sch = Scheduler(EngineConfig(), marker, EOT)
    s = session("a", 0)
    add_frames(s, [0, 1])
    a = add_question(s)
    add_frames(s, [2])
    step = sch.schedule([s])
    assert [f.t for f in step.rows[0].frames] == [0.0, 1.0]  # not frame 2, queued after the question
    assert a.phase == "queued"
    finish_step(step, [s])
    step = sch.schedule([s])
    assert kinds(step) == {"a": "question"} and a.phase == "prefill"
    finish_step(step, [s])
    a.phase, a.pending = "decode", 7
    assert kinds(sch.schedule([s])) == {"a": "extend"}  # frame 2 waits while the turn is open
    finish_step(step, [s])
    a.close("stop")
    a.pending = None
    row = sch.schedule([s]).rows[0]
    assert row.extend == tuple(EOT) and row.sample is None  # the turn's end, no sampling
    a.end()
    s.active = None
    assert [f.t for f in sch.schedule([s]).rows[0].frames] == [2.0]


def test_first_row_carries_the_system_prompt():
    sch = Scheduler(EngineConfig(), marker, EOT)
    s = session("a", 0, started=False)
    add_frames(s, [0])
    assert sch.schedule([s]).rows[0].system == (1, 2)
    s.started = True
    add_frames(s, [1])
    assert sch.schedule([s]).rows[0].system is None


def test_cancel_before_the_question_is_in_ends_it_and_during_decode_closes_the_turn():
    sch = Scheduler(EngineConfig(), marker, EOT)
    s = session("a", 0)
    a = add_question(s)
    sch.schedule([s])
    finish_step(None, [s])
    a.cancelled = True  # still in prefill: nothing of it is in the cache
    assert sch.schedule([s]) is None and a.ended and a.finish_reason == "cancelled" and s.active is None
    b = add_question(s)
    sch.schedule([s])
    b.phase, b.pending = "decode", 42
    b.cancelled = True
    row = sch.schedule([s]).rows[0]
    assert row.extend == (42, *EOT) and row.sample is None and b.finish_reason == "cancelled"


def test_row_cap_rotates_across_sessions_and_due_frames_go_first():
    sch = Scheduler(EngineConfig(max_batch_rows=1, decode_steps_per_frame_step=4), marker, EOT)
    ss = [session(x, i) for i, x in enumerate("abc")]
    for s in ss[:2]:
        a = add_question(s)
        a.phase, a.pending = "decode", 3
        s.answers.popleft()
        s.active = a
    add_frames(ss[2], range(3))
    order = []
    for _ in range(8):
        step = sch.schedule(ss)
        assert len(step.rows) == 1
        order.append(next(iter(kinds(step))))
        finish_step(step, ss)
    assert set(order[:3]) == {"a", "b"} and order[3] == "c"  # frames due on the 4th step take the one row
    assert order.count("a") >= 3 and order.count("b") >= 3


def test_a_turn_with_nothing_to_put_in_ends_without_a_row():
    """A chat format without an end-of-turn marker and an answer that ended on EOS: nothing is
    left to write, so the answer ends at once instead of sending an empty row."""
    sch = Scheduler(EngineConfig(), marker, [])
    s = session("a", 0)
    a = add_question(s)
    sch.schedule([s])
    a.phase, a.pending = "decode", None
    a.close("stop")
    assert sch.schedule([s]) is None and a.ended and a.finish_reason == "stop" and s.active is None
