"""Apply a step's results to the loop's state (vLLM's update_from_output): frame futures,
sampled tokens into answers, answer ends. Runs on the event loop only."""
from __future__ import annotations

from ..errors import StreamError
from .state import SessionState
from .step import Step, StepOutput


def apply(step: Step, out: StepOutput, states: dict[str, SessionState]) -> None:
    for row, res in zip(step.rows, out.results):
        s = states[row.session]
        s.in_flight = False
        s.cache = res.cache or s.cache
        s.started = s.started or res.started
        for f, err in zip(row.frames, res.frame_errors or []):
            done = s.frame_futures.pop(f.seq, None)
            if done is not None and not done.done():
                if err is None and s.closed:
                    err = StreamError("session_closed", f"session {s.id!r} was closed")
                done.set_result(None) if err is None else done.set_exception(err)
        a = s.active
        if not row.frames and a is not None:
            if res.error is not None:
                a.end("error", res.error)
            elif row.sample is not None:
                a.take(res.token)
                if a.cancelled and a.phase == "decode":
                    a.close("cancelled")
            else:  # the turn's end is in: the answer is complete
                a.end()
            if s.closed and not a.ended:
                a.end("cancelled")
            if a.ended:
                s.active = None
        s.idle.set()
