"""What `run_stream.py live` prints: each event in plain words for a person, or one JSON
object per line (`--json`) for a script. Events come from pipelines/live_qa.py:

    camera:  {"event": "connected" | "disconnected" | "reconnecting" | "stalled" | "ended" | "warning", ...}
    answers: {"event": "first_answer", "question", "answer", "t"}   the first answer of a standing question
             {"alert": question, "before", "after", "answer", "t"}    a standing answer changed
             {"question", "answer"}                                   an ad-hoc question typed on stdin

    12:01:02 camera connected: rtsp://cam/door
    12:01:05 [video 3.0 s] "Is the door open?" -> No
    12:01:40 camera lost (connection ended); reconnecting
    12:01:41 reconnecting to the camera (attempt 1, waiting 0.5 s)
    12:01:43 camera back (reconnect 1)
    12:01:55 ALERT [video 44.0 s] "Is the door open?": no -> yes ("Yes.")
"""
from __future__ import annotations

import json
import sys
import time


def clock(unix: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix if unix is not None else time.time()))


def words(ev: dict) -> str:
    """One line for a person."""
    at = clock(ev.get("time"))
    kind = ev.get("event")
    if "alert" in ev:
        return (f'{at} ALERT [video {ev["t"]:.1f} s] "{ev["alert"]}": {ev["before"]} -> {ev["after"]}'
                f' ("{ev["answer"]}")')
    if kind == "first_answer":
        return f'{at} [video {ev["t"]:.1f} s] "{ev["question"]}" -> {ev["answer"] or "(no answer)"}'
    if kind is None and "question" in ev:
        return f'{at} Q: {ev["question"]}\n{at} A: {ev["answer"] or "(no answer)"}'
    if kind == "connected":
        n = ev.get("reconnects") or 0
        via = f" (RTSP over {ev['rtsp_transport'].upper()})" if ev.get("rtsp_transport") else ""
        return f"{at} camera back (reconnect {n}){via}" if n else f"{at} camera connected: {ev.get('source', '')}{via}"
    if kind == "disconnected":
        reason = {"eof": "connection ended", "stalled": "no data"}.get(ev.get("reason"), ev.get("reason") or "")
        return f"{at} camera lost ({reason}); reconnecting"
    if kind == "reconnecting":
        return f"{at} reconnecting to the camera (attempt {ev.get('attempt', '?')}, waiting {ev.get('delay', 0):g} s)"
    if kind == "stalled":
        return f"{at} camera stalled: {ev.get('message', 'no data')}"
    if kind == "ended":
        return f"{at} the video ended"
    if kind == "gone":
        return f"{at} camera gone: {ev.get('message', '')}"
    return f"{at} {kind}: {ev.get('message', '')}"


class Printer:
    """`Printer(json_lines)(event)`: prints to stdout at once (flushed: the reader may be a pipe)."""

    def __init__(self, json_lines: bool = False, out=None):
        self.json_lines, self.out = json_lines, out or sys.stdout

    def __call__(self, ev: dict) -> None:
        line = json.dumps(ev, ensure_ascii=False) if self.json_lines else words(ev)
        print(line, file=self.out, flush=True)
